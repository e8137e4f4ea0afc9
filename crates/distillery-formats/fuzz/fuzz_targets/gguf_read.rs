//! Any bytes given to the GGUF reader, and whatever it accepts given to the model import, end
//! in a value or an error: never a panic, an out-of-bounds read or an unbounded allocation.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = distillery_formats::gguf::read(data) {
        let _ = distillery_formats::gguf::import_llama(&file, &burn::tensor::Device::flex());
    }
});
