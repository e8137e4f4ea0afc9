//! Any bytes given to the GGUF reader, and whatever it accepts given to the block decoders, the
//! tokenizer conversion and the model import, end in a value or an error: never a panic, an
//! out-of-bounds read or an unbounded allocation.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = distillery_formats::gguf::read(data.to_vec()) {
        for tensor in file.tensors() {
            let _ = file.tensor_values(tensor);
        }
        let _ = distillery_formats::gguf::tokenizer_from_gguf(&file);
        let _ = distillery_formats::gguf::import(&file, &burn::tensor::Device::flex());
    }
});
