//! Fuzzes qcoder's GGUF reader: any byte string must parse or fail with a
//! typed error, without panics or allocations larger than the input; every
//! tensor the header accepts must then decode within its bounds.
//!
//!   cargo +nightly fuzz run gguf_reader [-- -max_total_time=600]

#![no_main]

use libfuzzer_sys::fuzz_target;

// The reader and codecs, compiled from qcoder's own sources.
#[path = "gguf_mod.rs"]
mod gguf;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = gguf::reader::Header::parse(data) else {
        return;
    };
    for (key, value) in &header.metadata {
        let _ = (key.len(), value.to_string().len());
    }
    for t in &header.tensors {
        // Bounded by the input: parse() checked the data lies inside it.
        let start = (header.data_offset + t.offset) as usize;
        let bytes = &data[start..start + t.n_bytes() as usize];
        if t.ty.can_decode() && t.n_elements() > 0 {
            let decoded = gguf::codec::decode(t.ty, bytes, t.row_len(), t.n_elements() as usize)
                .expect("a tensor the header accepted must decode");
            assert_eq!(decoded.len() as u64, t.n_elements());
        }
    }
});
