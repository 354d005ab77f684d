//! The factory and control JSON-lines codecs on arbitrary byte streams, as a server reads them.
//!
//! The first input byte says where to cut the rest into reads (so lines split across reads in
//! every way); the rest is the stream. Must never panic; the line buffer stays bounded and hands
//! out only newline-terminated lines of at most `MAX_LINE` bytes, one result per line in stream
//! order; every request or response that decodes encodes to one line that decodes to the same
//! value.

#![no_main]

use ivshm_proto::control::{ControlRequest, ControlResponse};
use ivshm_proto::factory::{
    decode_line, encode_line, FactoryRequest, FactoryResponse, LineBuffer, MAX_LINE,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `line` as `T`; if that works, its encoding is one line that decodes to it again.
fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(line: &[u8]) {
    let Ok(value) = decode_line::<T>(line) else {
        return;
    };
    let encoded = encode_line(&value);
    assert_eq!(encoded.iter().filter(|&&b| b == b'\n').count(), 1);
    assert_eq!(encoded.last(), Some(&b'\n'));
    match decode_line::<T>(&encoded) {
        Ok(again) => assert_eq!(again, value),
        Err(error) => panic!("{value:?} encodes to a line that does not decode: {error}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(cut).max(1);
    let mut buffer = LineBuffer::new();
    let mut results = 0usize;
    for read in stream.chunks(read_size) {
        buffer.push(read);
        assert!(buffer.pending_len() <= MAX_LINE);
        while let Some(line) = buffer.next_line() {
            results += 1;
            let Ok(line) = line else {
                continue;
            };
            assert!(line.len() <= MAX_LINE);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            round_trips::<FactoryRequest>(&line);
            round_trips::<FactoryResponse>(&line);
            round_trips::<ControlRequest>(&line);
            round_trips::<ControlResponse>(&line);
        }
    }
    // One result per newline at most (an oversized line is one error up to its newline).
    let newlines = stream.iter().filter(|&&b| b == b'\n').count();
    assert!(
        results <= newlines + 1,
        "{results} results for {newlines} lines"
    );
    // The whole input as one line, as `decode_line` sees a line a client sent.
    let _ = decode_line::<FactoryRequest>(stream);
    let _ = decode_line::<ControlRequest>(stream);
});
