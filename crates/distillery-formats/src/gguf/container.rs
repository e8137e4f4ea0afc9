//! The GGUF container, version 3: a bounds-checked reader of any well-formed file and a writer.
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64); the metadata
//! as (key, value type, value); the tensor infos as (name, dimension count, dimensions
//! innermost first, ggml type, data offset); padding to `general.alignment`; the tensor data,
//! each tensor at an aligned offset. Every integer is little-endian; strings are a u64 length
//! and UTF-8 bytes; an array is its element type, a u64 count and the elements.

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
    /// Elements of one type.
    Array(ValueType, Vec<Value>),
}

impl Value {
    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        Self::Array(
            ValueType::String,
            items.into_iter().map(Value::String).collect(),
        )
    }

    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(ValueType::I32, items.into_iter().map(Value::I32).collect())
    }

    pub fn f32s(items: impl IntoIterator<Item = f32>) -> Self {
        Self::Array(ValueType::F32, items.into_iter().map(Value::F32).collect())
    }

    fn kind(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
            Self::Array(..) => ValueType::Array,
        }
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
            Self::Array(ValueType::String, items) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }

    /// The items of an array of integers, as i64.
    pub fn as_integers(&self) -> Option<Vec<i64>> {
        match self {
            Self::Array(_, items) => items
                .iter()
                .map(|item| match *item {
                    Value::I8(v) => Some(v.into()),
                    Value::I16(v) => Some(v.into()),
                    Value::I32(v) => Some(v.into()),
                    Value::I64(v) => Some(v),
                    _ => item.as_u64().and_then(|v| i64::try_from(v).ok()),
                })
                .collect(),
            _ => None,
        }
    }

    /// The items of an array of floats.
    pub fn as_floats(&self) -> Option<Vec<f32>> {
        match self {
            Self::Array(_, items) => items
                .iter()
                .map(|item| match *item {
                    Value::F32(v) => Some(v),
                    Value::F64(v) => Some(v as f32),
                    _ => None,
                })
                .collect(),
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
    /// Values in the tensor.
    pub fn values(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the tensor's data, when its type is known.
    pub fn bytes(&self) -> Option<u64> {
        let kind = self.kind.ok()?;
        let row = self.dims.first().copied().unwrap_or(1);
        let rows: u64 = self.dims.iter().skip(1).product();
        let block_values = kind.block_values() as u64;
        row.is_multiple_of(block_values)
            .then(|| row / block_values * kind.block_bytes() as u64 * rows)
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
        "tensor `{tensor}` is {kind}, which distillery does not read (it reads F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K)"
    )]
    UnsupportedType { tensor: String, kind: String },
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
}

/// A parsed GGUF file: its metadata and tensor table, and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
}

impl GgufFile {
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.metadata
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|tensor| tensor.name == name)
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The stored bytes of a tensor of a type distillery reads.
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> Result<&[u8], GgufError> {
        let kind = readable(tensor)?;
        let length = tensor.bytes().ok_or_else(|| GgufError::Tensor {
            tensor: tensor.name.clone(),
            message: format!(
                "rows of {} values are not whole {kind} blocks",
                tensor.dims.first().copied().unwrap_or(1)
            ),
        })?;
        // `read` checked that the data lies inside the file.
        let start = tensor.start as usize;
        Ok(&self.bytes[start..start + length as usize])
    }

    /// A tensor's values as floats, dequantized as ggml does.
    pub fn tensor_values(&self, tensor: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let kind = readable(tensor)?;
        let bytes = self.tensor_bytes(tensor)?;
        let mut values = vec![0.0; bytes.len() / kind.block_bytes() * kind.block_values()];
        ggml::dequantize(kind, bytes, &mut values);
        Ok(values)
    }
}

fn readable(tensor: &TensorInfo) -> Result<GgmlType, GgufError> {
    match tensor.kind {
        Ok(kind) if kind.is_readable() => Ok(kind),
        _ => Err(GgufError::UnsupportedType {
            tensor: tensor.name.clone(),
            kind: tensor.type_name(),
        }),
    }
}

/// A cursor that never reads past the end and never allocates more than the bytes left.
struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
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

    fn value(&mut self, kind: ValueType, depth: usize) -> Result<Value, GgufError> {
        Ok(match kind {
            ValueType::U8 => Value::U8(self.take(1)?[0]),
            ValueType::I8 => Value::I8(self.take(1)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return self.fail(format!("a bool holds {other}")),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Array => {
                if depth >= MAX_NESTING {
                    return self.fail("arrays nest too deeply");
                }
                let element = self.value_type()?;
                let count = self.count(element.min_bytes())?;
                let items = (0..count)
                    .map(|_| self.value(element, depth + 1))
                    .collect::<Result<_, _>>()?;
                Value::Array(element, items)
            }
        })
    }
}

/// Parses a GGUF file: its metadata and tensor table, every length, count and offset checked
/// against the file before it is used. Tensors of types distillery does not read are listed;
/// their data is refused when asked for.
pub fn read(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
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
    let mut metadata = Vec::with_capacity(metadata_count);
    for _ in 0..metadata_count {
        let key = cursor.string()?;
        let kind = cursor.value_type()?;
        let value = cursor.value(kind, 0)?;
        if metadata.iter().any(|(existing, _)| *existing == key) {
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
        if infos.iter().any(|info: &(String, _, _, _)| info.0 == name) {
            return cursor.fail(format!("tensor `{name}` appears twice"));
        }
        infos.push((name, dims, type_id, offset));
    }
    let data_start = (cursor.position as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, type_id, offset) in infos {
        let values = dims
            .iter()
            .try_fold(1u64, |product, &dim| product.checked_mul(dim));
        let start = data_start.checked_add(offset);
        let (Some(_), Some(start)) = (values, start) else {
            return cursor.fail(format!("tensor `{name}` has an impossible size or offset"));
        };
        let tensor = TensorInfo {
            name,
            dims,
            kind: GgmlType::from_id(type_id).ok_or(type_id),
            start,
        };
        if let Ok(kind) = tensor.kind {
            let Some(length) = tensor.bytes() else {
                return cursor.fail(format!(
                    "tensor `{}` has rows of {} values, not whole {kind} blocks",
                    tensor.name,
                    tensor.dims.first().copied().unwrap_or(1)
                ));
            };
            if start
                .checked_add(length)
                .is_none_or(|end| end > bytes.len() as u64)
            {
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
    fn encoded(&self) -> Vec<u8> {
        match &self.data {
            TensorData::Blocks(bytes) => bytes.clone(),
            TensorData::Values(values) => match self.kind {
                GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                GgmlType::F16 => values
                    .iter()
                    .flat_map(|&v| f32_to_f16(v).to_le_bytes())
                    .collect(),
                GgmlType::Q8_0 => ggml::quantize_q8_0(values),
                GgmlType::Q4_0 => ggml::quantize_q4_0(values),
                other => unreachable!("distillery does not quantize to {other}"),
            },
        }
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
        Value::Array(element, items) => {
            out.extend_from_slice(&element.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                debug_assert_eq!(item.kind(), *element, "array items of one type");
                put_value(out, item);
            }
        }
    }
}

fn pad_to_alignment(out: &mut Vec<u8>) {
    let padding = (ALIGNMENT - out.len() as u64 % ALIGNMENT) % ALIGNMENT;
    out.resize(out.len() + padding as usize, 0);
}

/// The bytes of a GGUF file holding `metadata` and `tensors` (quantized types need rows of
/// whole blocks).
pub fn write(metadata: &[(String, Value)], tensors: &[GgufTensor]) -> Vec<u8> {
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
    let encoded: Vec<Vec<u8>> = tensors.iter().map(GgufTensor::encoded).collect();
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
    out
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
                Value::Array(
                    ValueType::Array,
                    vec![Value::i32s([1, 2]), Value::i32s([3])],
                ),
            ),
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
        let bytes = write(&metadata, &tensors);
        assert_eq!(bytes.len() as u64 % ALIGNMENT, 0);
        let file = read(bytes).unwrap();
        assert_eq!(file.metadata, metadata);
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
                Value::Array(_, items) => items[0].as_integers(),
                _ => None,
            }),
            Some(vec![1, 2])
        );
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
        let mut bytes = write(&metadata, &tensors);
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
        let bytes = write(&metadata, &tensors);
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
