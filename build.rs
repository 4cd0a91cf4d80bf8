fn main() {
    // Only the napi build needs Node's linker settings; plain `cargo test` does not.
    if std::env::var_os("CARGO_FEATURE_NODE").is_some() {
        napi_build::setup();
    }
}
