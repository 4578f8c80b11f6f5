"""wasm-sandboxer: WebAssembly pods under containerd 2.x (wasmtime, WASI preview 1; WasmEdge optional)."""
