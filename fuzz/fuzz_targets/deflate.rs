#![no_main]
//! See wsclient::testing::fuzz_deflate for the input layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsclient::testing::fuzz_deflate(data));
