//! `distillery inspect`: a GGUF file's metadata and tensor table, whatever types it holds.

use std::path::Path;

use distillery_formats::gguf::{GgufFile, Value};

pub fn run(path: &Path) -> anyhow::Result<()> {
    let file = distillery_formats::source::read_gguf(path)?;
    print!("{}", describe(path, &file));
    Ok(())
}

fn describe(path: &Path, file: &GgufFile) -> String {
    let mut out = format!(
        "{}: GGUF version {}, {} bytes, {} metadata entries, {} tensors\n",
        path.display(),
        file.version(),
        file.len(),
        file.metadata().len(),
        file.tensors().len()
    );
    for (key, value) in file.metadata() {
        out.push_str(&format!("  {key} = {}\n", describe_value(value)));
    }
    let mut by_type: Vec<(String, usize, u64)> = Vec::new();
    for tensor in file.tensors() {
        let bytes = tensor.bytes();
        out.push_str(&format!(
            "  {} {} {:?} {}\n",
            tensor.name,
            tensor.type_name(),
            tensor.dims,
            bytes.map_or_else(
                || "size unknown".to_string(),
                |bytes| format!("{bytes} bytes")
            ),
        ));
        let name = tensor.type_name();
        match by_type.iter_mut().find(|(kind, _, _)| *kind == name) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += bytes.unwrap_or(0);
            }
            None => by_type.push((name, 1, bytes.unwrap_or(0))),
        }
    }
    let summary: Vec<String> = by_type
        .iter()
        .map(|(kind, count, bytes)| format!("{count} {kind} ({bytes} bytes)"))
        .collect();
    out.push_str(&format!("  tensors by type: {}\n", summary.join(", ")));
    out
}

/// A metadata value: arrays by their length and first items, long strings cut.
fn describe_value(value: &Value) -> String {
    match value {
        Value::U8(v) => v.to_string(),
        Value::I8(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        Value::F32(v) => v.to_string(),
        Value::F64(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
        Value::String(v) if v.chars().count() > 120 => {
            let head: String = v.chars().take(120).collect();
            format!("{head:?}... ({} characters)", v.chars().count())
        }
        Value::String(v) => format!("{v:?}"),
        Value::Array(items) => {
            let shown: Vec<String> = (0..items.len().min(5))
                .filter_map(|index| items.item(index))
                .map(|item| describe_value(&item))
                .collect();
            if items.len() > 5 {
                format!("[{}, ...] ({} items)", shown.join(", "), items.len())
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
    }
}
