#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| badgegate::kit::fuzzing::protime_answer(data));
