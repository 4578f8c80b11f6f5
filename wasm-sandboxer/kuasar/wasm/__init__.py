"""wasm-sandboxer: WebAssembly pods (wasmtime). Not implemented yet; see the README's status table."""
