//! The list of config keys, read from the config structs themselves: a serde `Deserializer`
//! that records the field names a struct asks for, so the documentation test compares
//! docs/config.md against the code and not against a second hand-kept list.

use serde::de::{self, DeserializeOwned, Visitor};

/// Field names that `T::deserialize` asks for (its `#[derive(Deserialize)]` field list).
pub(crate) fn fields_of<T: DeserializeOwned>() -> Vec<&'static str> {
    let mut rec = Recorder(Vec::new());
    // The recorder always errors after recording: that is how it stops.
    let _ = T::deserialize(&mut rec);
    rec.0
}

struct Recorder(Vec<&'static str>);

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("recorded")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for &mut Recorder {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        self.0.extend_from_slice(fields);
        Err(Stop)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}
