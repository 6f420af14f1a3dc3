//! The shape of an accumulator type, as serde sees its default value: the type and field
//! names and the primitive types, in order (`CountSum{count:u64,sum:f64}`). Two types whose
//! postcard encodings differ in layout have different shapes as long as the difference shows
//! in the default value (a new field, a removed or renamed one, a field whose type changed);
//! what an empty `Vec` or a `None` would hold does not show. [`crate::Aggregate::state_layout`]
//! hashes it into the default layout id.

use serde::ser::{self, Serialize};
use std::fmt::{self, Write as _};

/// The shape of `value`.
pub(crate) fn of<T: Serialize>(value: &T) -> String {
    let mut shape = Shape(String::new());
    // A type whose `Serialize` fails on its own default value has no shape but its error.
    if let Err(e) = value.serialize(&mut shape) {
        return format!("unserializable:{e}");
    }
    shape.0
}

/// A 64-bit FNV-1a hash of `text`, as 16 hex digits: stable across builds and targets.
pub(crate) fn hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

struct Shape(String);

#[derive(Debug)]
struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Error(message.to_string())
    }
}

impl Shape {
    fn put(&mut self, text: &str) -> Result<(), Error> {
        self.0.push_str(text);
        Ok(())
    }

    /// Starts a compound: `open`, its items, `close`.
    fn open(&mut self, open: &str, close: &'static str) -> Result<Compound<'_>, Error> {
        self.put(open)?;
        Ok(Compound {
            shape: self,
            first: true,
            close,
        })
    }
}

/// A compound being written: its items are separated by commas.
struct Compound<'a> {
    shape: &'a mut Shape,
    first: bool,
    close: &'static str,
}

impl Compound<'_> {
    fn item(&mut self, name: Option<&str>) {
        if !self.first {
            self.shape.0.push(',');
        }
        self.first = false;
        if let Some(name) = name {
            // Writing to a String cannot fail.
            let _ = write!(self.shape.0, "{name}:");
        }
    }

    fn end(self) -> Result<(), Error> {
        self.shape.put(self.close)
    }
}

macro_rules! primitive {
    ($($method:ident($ty:ty) => $name:literal),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), Error> {
            self.put($name)
        })*
    };
}

impl<'a> ser::Serializer for &'a mut Shape {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'a>;
    type SerializeTuple = Compound<'a>;
    type SerializeTupleStruct = Compound<'a>;
    type SerializeTupleVariant = Compound<'a>;
    type SerializeMap = Compound<'a>;
    type SerializeStruct = Compound<'a>;
    type SerializeStructVariant = Compound<'a>;

    primitive! {
        serialize_bool(bool) => "bool",
        serialize_i8(i8) => "i8",
        serialize_i16(i16) => "i16",
        serialize_i32(i32) => "i32",
        serialize_i64(i64) => "i64",
        serialize_i128(i128) => "i128",
        serialize_u8(u8) => "u8",
        serialize_u16(u16) => "u16",
        serialize_u32(u32) => "u32",
        serialize_u64(u64) => "u64",
        serialize_u128(u128) => "u128",
        serialize_f32(f32) => "f32",
        serialize_f64(f64) => "f64",
        serialize_char(char) => "char",
        serialize_str(&str) => "str",
        serialize_bytes(&[u8]) => "bytes",
    }

    fn serialize_none(self) -> Result<(), Error> {
        self.put("option")
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Error> {
        self.put("option<")?;
        value.serialize(&mut *self)?;
        self.put(">")
    }

    fn serialize_unit(self) -> Result<(), Error> {
        self.put("()")
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<(), Error> {
        self.put(name)
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.put(&format!("{name}::{variant}"))
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.put(&format!("{name}("))?;
        value.serialize(&mut *self)?;
        self.put(")")
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.put(&format!("{name}::{variant}("))?;
        value.serialize(&mut *self)?;
        self.put(")")
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Compound<'a>, Error> {
        self.open("seq[", "]")
    }

    fn serialize_tuple(self, _len: usize) -> Result<Compound<'a>, Error> {
        self.open("(", ")")
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, Error> {
        self.open(&format!("{name}("), ")")
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, Error> {
        self.open(&format!("{name}::{variant}("), ")")
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Compound<'a>, Error> {
        self.open("map{", "}")
    }

    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Compound<'a>, Error> {
        self.open(&format!("{name}{{"), "}")
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Compound<'a>, Error> {
        self.open(&format!("{name}::{variant}{{"), "}")
    }
}

/// The compound serializers whose items are unnamed (`serialize_element` or `serialize_field`).
macro_rules! unnamed {
    ($($trait:ident::$method:ident),* $(,)?) => {
        $(impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Error;

            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
                self.item(None);
                value.serialize(&mut *self.shape)
            }

            fn end(self) -> Result<(), Error> {
                Compound::end(self)
            }
        })*
    };
}

/// The compound serializers whose fields are named.
macro_rules! named {
    ($($trait:ident),* $(,)?) => {
        $(impl ser::$trait for Compound<'_> {
            type Ok = ();
            type Error = Error;

            fn serialize_field<T: ?Sized + Serialize>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Error> {
                self.item(Some(key));
                value.serialize(&mut *self.shape)
            }

            fn end(self) -> Result<(), Error> {
                Compound::end(self)
            }
        })*
    };
}

unnamed! {
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
}

named! {
    SerializeStruct,
    SerializeStructVariant,
}

impl ser::SerializeMap for Compound<'_> {
    type Ok = ();
    type Error = Error;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), Error> {
        self.item(None);
        key.serialize(&mut *self.shape)?;
        self.shape.put(":")
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut *self.shape)
    }

    fn end(self) -> Result<(), Error> {
        Compound::end(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, serde::Serialize)]
    struct CountSum {
        count: u64,
        sum: f64,
        last: Option<i64>,
        seen: Vec<String>,
    }

    #[derive(Default, serde::Serialize)]
    struct Count(u64);

    #[derive(Default, serde::Serialize)]
    struct Signed(i64);

    #[test]
    fn shapes_name_types_fields_and_primitives() {
        assert_eq!(
            of(&CountSum::default()),
            "CountSum{count:u64,sum:f64,last:option,seen:seq[]}"
        );
        assert_eq!(of(&Count::default()), "Count(u64)");
        assert_eq!(of(&(1u8, "x")), "(u8,str)");
        assert_ne!(hash(&of(&Count::default())), hash(&of(&Signed::default())));
        assert_eq!(hash(""), "cbf29ce484222325");
    }
}
