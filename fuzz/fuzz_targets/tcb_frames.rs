#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| badgegate::fuzzing::tcb_frames(data));
