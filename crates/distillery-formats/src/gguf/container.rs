//! The GGUF container, version 3: a bounds-checked reader of any well-formed file and a writer.
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64); the metadata
//! as (key, value type, value); the tensor infos as (name, dimension count, dimensions
//! innermost first, ggml type, data offset); padding to `general.alignment`; the tensor data,
//! each tensor at an aligned offset. Every integer is little-endian; strings are a u64 length
//! and UTF-8 bytes; an array is its element type, a u64 count and the elements.

use std::collections::HashSet;

use distillery_quant::f16::f32_to_f16;
use distillery_quant::ggml::{self, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;
/// Arrays of arrays deeper than this are refused: no real file nests, and a hostile one must
/// not recurse without bound.
const MAX_NESTING: usize = 4;

/// A GGUF value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    const ALL: [ValueType; 13] = [
        Self::U8,
        Self::I8,
        Self::U16,
        Self::I16,
        Self::U32,
        Self::I32,
        Self::F32,
        Self::Bool,
        Self::String,
        Self::Array,
        Self::U64,
        Self::I64,
        Self::F64,
    ];

    fn id(self) -> u32 {
        Self::ALL
            .iter()
            .position(|&kind| kind == self)
            .expect("every type is listed") as u32
    }

    fn from_id(id: u32) -> Option<Self> {
        Self::ALL.get(id as usize).copied()
    }

    /// The fewest bytes one value of the type takes.
    fn min_bytes(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Array),
}

/// An array value: elements of one type, kept in a vector of that type, so an array takes about
/// the memory its bytes in the file do.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<Array>),
}

/// Calls `$callback` with the variant name every scalar type has in [`Value`], [`Array`] and
/// [`ValueType`] alike, so the per-type matches are written once.
macro_rules! with_scalar_types {
    ($callback:ident) => {
        $callback!(U8, I8, U16, I16, U32, I32, F32, Bool, String, U64, I64, F64)
    };
}

impl Array {
    pub fn len(&self) -> usize {
        macro_rules! length {
            ($($name:ident),*) => {
                match self {
                    $(Self::$name(items) => items.len(),)*
                    Self::Array(items) => items.len(),
                }
            };
        }
        with_scalar_types!(length)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn element(&self) -> ValueType {
        macro_rules! element {
            ($($name:ident),*) => {
                match self {
                    $(Self::$name(_) => ValueType::$name,)*
                    Self::Array(_) => ValueType::Array,
                }
            };
        }
        with_scalar_types!(element)
    }

    /// Item `index` as a value, for display.
    pub fn item(&self, index: usize) -> Option<Value> {
        macro_rules! item {
            ($($name:ident),*) => {
                match self {
                    $(Self::$name(items) => Value::$name(items.get(index)?.clone()),)*
                    Self::Array(items) => Value::Array(items.get(index)?.clone()),
                }
            };
        }
        Some(with_scalar_types!(item))
    }
}

impl Value {
    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        Self::Array(Array::String(items.into_iter().collect()))
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(Array::I32(items.into_iter().collect()))
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Self {
        Self::Array(Array::F32(items.into_iter().collect()))
    }

    fn kind(&self) -> ValueType {
        macro_rules! kind {
            ($($name:ident),*) => {
                match self {
                    $(Self::$name(_) => ValueType::$name,)*
                    Self::Array(_) => ValueType::Array,
                }
            };
        }
        with_scalar_types!(kind)
    }

    /// The value as an unsigned integer, whatever integer type stores it.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float. An f32 gives the shortest decimal that rounds to it (1e-5, not
    /// 9.99999974e-6): the number the model was configured with.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => v.to_string().parse().ok(),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The items of an array of strings.
    pub fn as_strings(&self) -> Option<Vec<&str>> {
        match self {
            Self::Array(Array::String(items)) => Some(items.iter().map(String::as_str).collect()),
            _ => None,
        }
    }

    /// The items of an array of integers, as i64.
    pub fn as_integers(&self) -> Option<Vec<i64>> {
        let Self::Array(array) = self else {
            return None;
        };
        Some(match array {
            Array::U8(items) => items.iter().map(|&v| v.into()).collect(),
            Array::I8(items) => items.iter().map(|&v| v.into()).collect(),
            Array::U16(items) => items.iter().map(|&v| v.into()).collect(),
            Array::I16(items) => items.iter().map(|&v| v.into()).collect(),
            Array::U32(items) => items.iter().map(|&v| v.into()).collect(),
            Array::I32(items) => items.iter().map(|&v| v.into()).collect(),
            Array::I64(items) => items.clone(),
            Array::U64(items) => items
                .iter()
                .map(|&v| i64::try_from(v).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }

    /// The items of an array of floats.
    pub fn as_floats(&self) -> Option<Vec<f32>> {
        match self {
            Self::Array(Array::F32(items)) => Some(items.clone()),
            Self::Array(Array::F64(items)) => Some(items.iter().map(|&v| v as f32).collect()),
            _ => None,
        }
    }
}

/// A tensor's entry in the file's table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Innermost (row) dimension first.
    pub dims: Vec<u64>,
    /// The ggml type, or the id of one distillery does not know.
    pub kind: Result<GgmlType, u32>,
    /// Where the data starts in the file.
    pub start: u64,
}

impl TensorInfo {
    /// Values in the tensor (saturating: a count no file holds).
    pub fn values(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |product, &dim| product.checked_mul(dim))
            .unwrap_or(u64::MAX)
    }

    /// Bytes of the tensor's data, when its type is known, its rows are whole blocks and the
    /// size is a number.
    pub fn bytes(&self) -> Option<u64> {
        let kind = self.kind.ok()?;
        let row = usize::try_from(self.dims.first().copied().unwrap_or(1)).ok()?;
        let rows = self
            .dims
            .iter()
            .skip(1)
            .try_fold(1u64, |product, &dim| product.checked_mul(dim))?;
        (kind.row_bytes(row)? as u64).checked_mul(rows)
    }

    /// The tensor's type, when distillery reads it; otherwise an error naming the tensor.
    pub fn readable_type(&self) -> Result<GgmlType, GgufError> {
        match self.kind {
            Ok(kind) if kind.is_readable() => Ok(kind),
            _ => Err(GgufError::UnsupportedType {
                tensor: self.name.clone(),
                kind: self.type_name(),
            }),
        }
    }

    /// The type's name, or the unknown id.
    pub fn type_name(&self) -> String {
        match self.kind {
            Ok(kind) => kind.name().to_string(),
            Err(id) => format!("unknown type {id}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GgufError {
    #[error("malformed GGUF at byte {offset}: {message}")]
    Malformed { offset: usize, message: String },
    #[error(
        "tensor `{tensor}` is {kind}, which distillery does not read (it reads {})",
        readable_names()
    )]
    UnsupportedType { tensor: String, kind: String },
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
    #[error("{0}")]
    Write(String),
}

fn readable_names() -> String {
    GgmlType::READABLE
        .iter()
        .map(|kind| kind.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A parsed GGUF file: its metadata and tensor table, and the bytes read of it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    /// The file's bytes, or only its first ones when the file was read for its metadata.
    bytes: Vec<u8>,
    /// The file's length.
    length: u64,
}

impl GgufFile {
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.metadata
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|tensor| tensor.name == name)
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The stored bytes of a tensor of a type distillery reads.
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> Result<&[u8], GgufError> {
        let kind = tensor.readable_type()?;
        let failure = |message: String| GgufError::Tensor {
            tensor: tensor.name.clone(),
            message,
        };
        let length = tensor.bytes().ok_or_else(|| {
            failure(format!(
                "rows of {} values are not whole {kind} blocks",
                tensor.dims.first().copied().unwrap_or(1)
            ))
        })?;
        let range = usize::try_from(tensor.start)
            .ok()
            .zip(usize::try_from(length).ok())
            .and_then(|(start, length)| Some(start..start.checked_add(length)?));
        range
            .and_then(|range| self.bytes.get(range))
            .ok_or_else(|| {
                failure("its data was not read (the file was read for its metadata)".into())
            })
    }

    /// A tensor's values as floats, dequantized as ggml does.
    pub fn tensor_values(&self, tensor: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let kind = tensor.readable_type()?;
        let bytes = self.tensor_bytes(tensor)?;
        let mut values = vec![0.0; bytes.len() / kind.block_bytes() * kind.block_values()];
        ggml::dequantize(kind, bytes, &mut values);
        Ok(values)
    }
}

/// A cursor that never reads past the end and never allocates more than the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

/// Reads `count` array elements of `size` bytes each, decoded by `decode`.
macro_rules! elements {
    ($cursor:expr, $count:expr, $size:literal, $decode:expr) => {{
        let bytes = $cursor.take($count * $size)?;
        bytes
            .chunks_exact($size)
            .map(|chunk| $decode(chunk.try_into().expect("chunk size")))
            .collect()
    }};
}

impl<'a> Cursor<'a> {
    fn fail<T>(&self, message: impl Into<String>) -> Result<T, GgufError> {
        Err(GgufError::Malformed {
            offset: self.position,
            message: message.into(),
        })
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .position
            .checked_add(count)
            .filter(|&end| end <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.position..end];
                self.position = end;
                Ok(slice)
            }
            None => self.fail(format!("{count} bytes needed, the file ends first")),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `item_bytes` each that must fit in the rest of the file.
    fn count(&mut self, item_bytes: usize) -> Result<usize, GgufError> {
        let count = self.u64()?;
        let left = (self.bytes.len() - self.position) as u64;
        if count.saturating_mul(item_bytes.max(1) as u64) > left {
            return self.fail(format!("a count of {count} exceeds what the file holds"));
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let length = self.count(1)?;
        let bytes = self.take(length)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_string()),
            Err(_) => self.fail("a string is not UTF-8"),
        }
    }

    fn value_type(&mut self) -> Result<ValueType, GgufError> {
        let id = self.u32()?;
        match ValueType::from_id(id) {
            Some(kind) => Ok(kind),
            None => self.fail(format!("value type {id} does not exist")),
        }
    }

    fn bool(&mut self) -> Result<bool, GgufError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => self.fail(format!("a bool holds {other}")),
        }
    }

    fn value(&mut self, kind: ValueType) -> Result<Value, GgufError> {
        Ok(match kind {
            ValueType::U8 => Value::U8(self.take(1)?[0]),
            ValueType::I8 => Value::I8(self.take(1)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => Value::Bool(self.bool()?),
            ValueType::String => Value::String(self.string()?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Array => Value::Array(self.array_value(0)?),
        })
    }

    fn array_value(&mut self, depth: usize) -> Result<Array, GgufError> {
        if depth >= MAX_NESTING {
            return self.fail("arrays nest too deeply");
        }
        let element = self.value_type()?;
        let count = self.count(element.min_bytes())?;
        Ok(match element {
            ValueType::U8 => Array::U8(self.take(count)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(count)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => Array::U16(elements!(self, count, 2, u16::from_le_bytes)),
            ValueType::I16 => Array::I16(elements!(self, count, 2, i16::from_le_bytes)),
            ValueType::U32 => Array::U32(elements!(self, count, 4, u32::from_le_bytes)),
            ValueType::I32 => Array::I32(elements!(self, count, 4, i32::from_le_bytes)),
            ValueType::F32 => Array::F32(elements!(self, count, 4, f32::from_le_bytes)),
            ValueType::U64 => Array::U64(elements!(self, count, 8, u64::from_le_bytes)),
            ValueType::I64 => Array::I64(elements!(self, count, 8, i64::from_le_bytes)),
            ValueType::F64 => Array::F64(elements!(self, count, 8, f64::from_le_bytes)),
            ValueType::Bool => {
                Array::Bool((0..count).map(|_| self.bool()).collect::<Result<_, _>>()?)
            }
            ValueType::String => Array::String(
                (0..count)
                    .map(|_| self.string())
                    .collect::<Result<_, _>>()?,
            ),
            ValueType::Array => Array::Array(
                (0..count)
                    .map(|_| self.array_value(depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

/// Parses a whole GGUF file: its metadata and tensor table, every length, count and offset
/// checked against the file before it is used. Tensors of types distillery does not read are
/// listed; their data is refused when asked for.
pub fn read(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    let length = bytes.len() as u64;
    parse(bytes, length)
}

/// Parses the first bytes of a GGUF file `length` bytes long, enough to hold its metadata and
/// tensor table: the tensors' data stays unread.
pub fn read_metadata(bytes: Vec<u8>, length: u64) -> Result<GgufFile, GgufError> {
    parse(bytes, length)
}

fn parse(bytes: Vec<u8>, length: u64) -> Result<GgufFile, GgufError> {
    let mut cursor = Cursor {
        bytes: &bytes,
        position: 0,
    };
    if cursor.take(4)? != MAGIC {
        return cursor.fail("not a GGUF file (magic)");
    }
    let version = cursor.u32()?;
    if version != VERSION {
        return cursor.fail(format!("version {version}; 3 is supported"));
    }
    let tensor_count = cursor.count(8 + 4 + 4 + 8)?;
    let metadata_count = cursor.count(8 + 4)?;
    let mut keys = HashSet::with_capacity(metadata_count);
    let mut metadata = Vec::with_capacity(metadata_count);
    for _ in 0..metadata_count {
        let key = cursor.string()?;
        let kind = cursor.value_type()?;
        let value = cursor.value(kind)?;
        if !keys.insert(key.clone()) {
            return cursor.fail(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(key, _)| key == "general.alignment") {
        None => ALIGNMENT,
        Some((_, value)) => match value.as_u64() {
            Some(alignment) if alignment > 0 && alignment.is_power_of_two() => alignment,
            _ => return cursor.fail(format!("general.alignment {value:?} is not a power of two")),
        },
    };
    let mut names = HashSet::with_capacity(tensor_count);
    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = cursor.string()?;
        let rank = cursor.u32()? as usize;
        if rank > 4 {
            return cursor.fail(format!("tensor `{name}` has {rank} dimensions"));
        }
        let dims = (0..rank)
            .map(|_| cursor.u64())
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = cursor.u32()?;
        let offset = cursor.u64()?;
        if !offset.is_multiple_of(alignment) {
            return cursor.fail(format!(
                "tensor `{name}`'s data is not aligned to {alignment}"
            ));
        }
        if !names.insert(name.clone()) {
            return cursor.fail(format!("tensor `{name}` appears twice"));
        }
        infos.push((name, dims, type_id, offset));
    }
    let data_start = (cursor.position as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, type_id, offset) in infos {
        let Some(start) = data_start.checked_add(offset) else {
            return cursor.fail(format!("tensor `{name}` has an impossible offset"));
        };
        let tensor = TensorInfo {
            name,
            dims,
            kind: GgmlType::from_id(type_id).ok_or(type_id),
            start,
        };
        if let Ok(kind) = tensor.kind {
            let Some(size) = tensor.bytes() else {
                return cursor.fail(format!(
                    "tensor `{}` of {:?} {kind} values has no size: rows that are not whole \
                     blocks, or too many values",
                    tensor.name, tensor.dims
                ));
            };
            if start.checked_add(size).is_none_or(|end| end > length) {
                return cursor.fail(format!(
                    "tensor `{}` runs past the end of the file",
                    tensor.name
                ));
            }
        }
        tensors.push(tensor);
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        bytes,
        length,
    })
}

/// A tensor to write: its GGUF name, dimensions innermost first, storage type and contents.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    pub data: TensorData,
}

/// What a written tensor holds.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Values to store as the tensor's type (F32, F16, Q8_0 or Q4_0) says.
    Values(Vec<f32>),
    /// Blocks already in the tensor's type, written as they are.
    Blocks(Vec<u8>),
}

impl GgufTensor {
    fn encoded(&self) -> Result<Vec<u8>, GgufError> {
        Ok(match &self.data {
            TensorData::Blocks(bytes) => bytes.clone(),
            TensorData::Values(values) => match self.kind {
                GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                GgmlType::F16 => values
                    .iter()
                    .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                    .collect(),
                GgmlType::Q8_0 => ggml::quantize_q8_0(values),
                GgmlType::Q4_0 => ggml::quantize_q4_0(values),
                other => {
                    return Err(GgufError::Write(format!(
                        "tensor `{}`: distillery does not quantize to {other}",
                        self.name
                    )));
                }
            },
        })
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A value's bytes, without its type.
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(v) => put_string(out, v),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(array) => put_array(out, array),
    }
}

fn put_array(out: &mut Vec<u8>, array: &Array) {
    out.extend_from_slice(&array.element().id().to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    match array {
        Array::U8(items) => out.extend_from_slice(items),
        Array::I8(items) => out.extend(items.iter().map(|&v| v as u8)),
        Array::U16(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::I16(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::U32(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::I32(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::F32(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::Bool(items) => out.extend(items.iter().map(|&v| u8::from(v))),
        Array::String(items) => items.iter().for_each(|item| put_string(out, item)),
        Array::U64(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::I64(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::F64(items) => out.extend(items.iter().flat_map(|v| v.to_le_bytes())),
        Array::Array(items) => items.iter().for_each(|item| put_array(out, item)),
    }
}

fn pad_to_alignment(out: &mut Vec<u8>) {
    let padding = (ALIGNMENT - out.len() as u64 % ALIGNMENT) % ALIGNMENT;
    out.resize(out.len() + padding as usize, 0);
}

/// The bytes of a GGUF file holding `metadata` and `tensors` (quantized types need rows of
/// whole blocks).
pub fn write(metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Result<Vec<u8>, GgufError> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend_from_slice(&value.kind().id().to_le_bytes());
        put_value(&mut out, value);
    }
    let encoded = tensors
        .iter()
        .map(GgufTensor::encoded)
        .collect::<Result<Vec<_>, _>>()?;
    let mut offset = 0u64;
    for (tensor, bytes) in tensors.iter().zip(&encoded) {
        put_string(&mut out, &tensor.name);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            out.extend_from_slice(&dim.to_le_bytes());
        }
        out.extend_from_slice(&tensor.kind.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad_to_alignment(&mut out);
    for bytes in &encoded {
        out.extend_from_slice(bytes);
        pad_to_alignment(&mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<(String, Value)>, Vec<GgufTensor>) {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("a.u8".into(), Value::U8(7)),
            ("a.i16".into(), Value::I16(-3)),
            ("a.f64".into(), Value::F64(0.25)),
            ("a.i64".into(), Value::I64(-1 << 40)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.floats".into(), Value::f32s([0.5, -1.0])),
            (
                "a.words".into(),
                Value::strings(["x".to_string(), "yz".into()]),
            ),
            (
                "a.nested".into(),
                Value::Array(Array::Array(vec![
                    Array::I32(vec![1, 2]),
                    Array::I32(vec![3]),
                ])),
            ),
            ("a.bytes".into(), Value::Array(Array::U8(vec![1, 2, 255]))),
        ];
        let tensors = vec![
            GgufTensor {
                name: "m".into(),
                dims: vec![64, 2],
                kind: GgmlType::Q8_0,
                data: TensorData::Values((0..128).map(|i| (i as f32 - 60.0) / 7.0).collect()),
            },
            GgufTensor {
                name: "v".into(),
                dims: vec![3],
                kind: GgmlType::F32,
                data: TensorData::Values(vec![1.0, 2.0, 3.0]),
            },
        ];
        (metadata, tensors)
    }

    #[test]
    fn every_value_type_and_tensor_reads_back() {
        let (metadata, tensors) = sample();
        let bytes = write(&metadata, &tensors).unwrap();
        assert_eq!(bytes.len() as u64 % ALIGNMENT, 0);
        let file = read(bytes.clone()).unwrap();
        assert_eq!(file.metadata(), metadata);
        let matrix = file.tensor("m").unwrap();
        assert_eq!(matrix.kind, Ok(GgmlType::Q8_0));
        assert_eq!(matrix.bytes(), Some(4 * 34));
        let TensorData::Values(values) = &tensors[0].data else {
            unreachable!()
        };
        let mut expected = vec![0.0; 128];
        ggml::dequantize(GgmlType::Q8_0, &ggml::quantize_q8_0(values), &mut expected);
        assert_eq!(file.tensor_values(matrix).unwrap(), expected);
        assert_eq!(
            file.tensor_values(file.tensor("v").unwrap()).unwrap(),
            [1.0, 2.0, 3.0]
        );
        assert_eq!(Value::F32(1e-5).as_f64(), Some(1e-5));
        assert_eq!(
            file.value("a.nested").and_then(|v| match v {
                Value::Array(array) => array.item(0)?.as_integers(),
                _ => None,
            }),
            Some(vec![1, 2])
        );
        // Read for its metadata only, a file lists its tensors but holds none of their data.
        let table_end = bytes.len() - 192;
        let head = read_metadata(bytes[..table_end].to_vec(), bytes.len() as u64).unwrap();
        assert_eq!(head.metadata(), metadata);
        assert_eq!(head.tensors(), file.tensors());
        let error = head
            .tensor_values(head.tensor("v").unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("was not read"), "{error}");
    }

    #[test]
    fn sizes_no_file_holds_are_refused() {
        let (metadata, _) = sample();
        // An F32 tensor of 2^62 values (2^64 bytes), and one of no values but 2^80 rows.
        for dims in [vec![1u64 << 62], vec![0, 1 << 40, 1 << 40]] {
            let tensor = GgufTensor {
                name: "huge".into(),
                dims,
                kind: GgmlType::F32,
                data: TensorData::Blocks(Vec::new()),
            };
            let bytes = write(&metadata, &[tensor]).unwrap();
            let error = read(bytes).unwrap_err().to_string();
            assert!(error.contains("`huge`"), "{error}");
        }
        let unwritable = GgufTensor {
            name: "q".into(),
            dims: vec![32],
            kind: GgmlType::Q4K,
            data: TensorData::Values(vec![0.0; 32]),
        };
        assert!(write(&metadata, &[unwritable]).is_err());
    }

    #[test]
    fn tensors_of_unread_types_are_listed_and_refused_by_name() {
        let (metadata, mut tensors) = sample();
        tensors.push(GgufTensor {
            name: "iq".into(),
            dims: vec![256],
            kind: GgmlType::Iq2Xxs,
            data: TensorData::Blocks(vec![0; 66]),
        });
        let mut bytes = write(&metadata, &tensors).unwrap();
        let file = read(bytes.clone()).unwrap();
        let iq = file.tensor("iq").unwrap();
        assert_eq!(iq.type_name(), "IQ2_XXS");
        let error = file.tensor_values(iq).unwrap_err().to_string();
        assert!(error.contains("`iq` is IQ2_XXS"), "{error}");
        // A type id ggml never used is listed under its number.
        let id = GgmlType::Iq2Xxs.id().to_le_bytes();
        let at = bytes
            .windows(4 + 8)
            .rposition(|window| window[..4] == id)
            .unwrap();
        bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
        let file = read(bytes).unwrap();
        assert_eq!(file.tensor("iq").unwrap().type_name(), "unknown type 77");
    }

    #[test]
    fn truncated_and_hostile_files_are_errors() {
        let (metadata, tensors) = sample();
        let bytes = write(&metadata, &tensors).unwrap();
        // The last cut falls inside the last tensor's data (12 bytes, then 20 of padding).
        for length in [0, 3, 10, 24, 100, bytes.len() / 2, bytes.len() - 21] {
            assert!(
                read(bytes[..length].to_vec()).is_err(),
                "a file cut at {length} bytes"
            );
        }
        let message = |bytes: Vec<u8>| match read(bytes) {
            Err(GgufError::Malformed { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert!(message(wrong_magic).contains("magic"));
        // A metadata count of 2^60 must be refused before anything is allocated for it.
        let mut huge_count = bytes.clone();
        huge_count[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(message(huge_count).contains("exceeds"));
        // A string length past the end of the file.
        let mut long_string = bytes.clone();
        long_string[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read(long_string).is_err());
        // A value type that does not exist.
        let mut bad_type = bytes;
        let key_end = 24 + 8 + "general.architecture".len();
        bad_type[key_end..key_end + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(message(bad_type).contains("value type 99"));
    }
}
