"""What a container process runs once it sits in the pod: a module or a component under wasmtime, or
WasmEdge.

This code runs only in the forked container process (launch.py), never in the task server: wasmtime
starts a compile thread pool the first time it compiles, and a process forked after that hangs on
its own first compile. The task server therefore imports wasmtime (loading the library starts no
thread) but never builds a Module; every container process compiles or deserializes for itself.

Exit codes (what Task.Wait reports):
  * `_start` returns                         -> 0
  * a component's `wasi:cli/run` returns ok / err, or it calls `wasi:cli/exit` with ok / err -> 0 / 1;
    `wasi:cli/exit.exit-with-code(n)` (an unstable interface wasmtime links) -> n
  * `proc_exit(n)`, 0 <= n <= 255            -> n. wasmtime refuses n >= 126 with an error that does not
    carry n, so `proc_exit` is served by our own host function, which records n and unwinds.
  * `proc_exit(n)`, n > 255                  -> 255 (no Linux exit status carries it; never a false 0)
  * a trap (unreachable, out-of-bounds, stack overflow, ...) -> 134 (128 + SIGABRT, as the wasmtime CLI
    reports traps), with wasmtime's message on the container's stderr
  * killed by a signal                       -> 128 + signal (the reaper's convention, as for runc)
  * the process could not start WasmEdge after Task.Start -> 126, with the reason on stderr

Memory: `linux.resources.memory.limit` is the store's limit on linear memory (`memory.grow` returns -1
past it; a module whose declared minimum exceeds it fails to instantiate, i.e. Task.Create fails),
and also the cgroup limit of the whole process (engine, compiled code and linear memory: ~4.5 MiB on
top of what the module touches). A module that really writes all the memory it may grow to can so
still be OOM-killed (137, OOMKilled), as any container that uses its whole limit.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuasar.common.errors import InvalidArgument

from .cache import ModuleCache, engine_fingerprint, module_digest
from .module import COMPONENT_VERSION

# `wasmtime.Config` attributes we set. They are part of every cache key: an artifact only
# deserializes under the Config that produced it. Defaults otherwise (Cranelift, optimise for speed,
# parallel compilation: a container process is a fresh fork that never compiled before).
ENGINE_SETTINGS: dict[str, object] = {}
TRAP_EXIT_STATUS = 134
UNREPRESENTABLE_EXIT_STATUS = 255
WASI_MODULE = "wasi_snapshot_preview1"
MAIN_INSTANCE = "kuasar:main"
# What a WASI preview 2 command exports (`wasi:cli/run@0.2.x`, whichever patch version it was built for).
RUN_INTERFACE = "wasi:cli/run"
# Outgoing HTTP (wasi:http/types and outgoing-handler) is linked only for a component that imports it:
# wasmtime's HTTP host starts its own client state per store, which no other component needs.
HTTP_PACKAGE = "wasi:http/"
WASM_PAGE = 65536
# WasmEdge's suffix of `--dir guest:host` for a preopen without write rights (it grants them all otherwise).
WASMEDGE_READONLY = ":readonly"
# The task server's pid (forbid_compiling_here): WasmtimeModule refuses to run there, so a mistake
# shows up as an error instead of every later container hanging.
_NO_COMPILE_PID = 0


def forbid_compiling_here() -> None:
    global _NO_COMPILE_PID
    _NO_COMPILE_PID = os.getpid()


@dataclass
class Preopen:
    host: str
    guest: str
    writable: bool = True


# What a WASI command runs; args[0] `module.wasm#name` names another export instead (runwasi's syntax).
DEFAULT_ENTRY = "_start"


@dataclass
class RunSpec:
    """Everything the module gets: resolved in the task server, used in the container process."""

    module: str  # host path of the .wasm file (inside the mounted rootfs)
    argv: list[str]
    env: list[str]  # "KEY=value"
    preopens: list[Preopen] = field(default_factory=list)
    memory_limit: int = 0  # bytes of linear memory (store limit); 0 = none
    cache_dir: str = ""  # "" disables the compiled-module cache
    cache_max_bytes: int = 0
    entry: str = DEFAULT_ENTRY  # the exported function run calls (args[0] `module.wasm#name`, as runwasi)


class ModuleError(Exception):
    """The module cannot be run (bad binary, unknown import, no _start, memory limit too small)."""


class ProcExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"proc_exit({code})")
        self.code = code


def proc_exit_status(code: int) -> int:
    code &= 0xFFFFFFFF  # WASI's exitcode is a u32; ctypes hands us the i32 bit pattern
    return code if code <= 255 else UNREPRESENTABLE_EXIT_STATUS


def _proc_exit(code: int) -> None:
    raise ProcExit(code)


def split_env(env: list[str]) -> list[list[str]]:
    pairs = []
    for entry in env:
        key, sep, value = entry.partition("=")
        if key and sep:
            pairs.append([key, value])
    return pairs


def load_module(engine: Any, path: Path, cache: ModuleCache | None, component: bool = False) -> tuple[Any, bool]:
    """Deserialize the cached artifact for `path`, or compile it (and store the artifact); a component
    with `component`, else a core module."""
    import wasmtime

    if component:
        import wasmtime.component  # ~7 ms of import: not on a core module's start

        kind: Any = wasmtime.component.Component
    else:
        kind = wasmtime.Module
    data = path.read_bytes()
    if cache is None:
        return kind(engine, data), False
    artifact = cache.path(module_digest(data), engine_fingerprint(ENGINE_SETTINGS))
    if artifact.is_file():
        try:
            module = kind.deserialize_file(engine, str(artifact))
            cache.touch(artifact)
            return module, True
        except wasmtime.WasmtimeError:
            pass  # truncated, or from another wasmtime build: compile afresh and replace it
    module = kind(engine, data)
    try:
        cache.store(artifact, bytes(module.serialize()))
    except OSError:
        pass  # a full disk costs the next start a compile, nothing more
    return module, False


def _reopenable(fd: int) -> str | None:
    """`/proc/self/fd/<fd>` when `fd` is a FIFO or a terminal, which opening anew (as WASI's file output
    does, with O_TRUNC) leaves as they are; None for anything else (a regular file would be emptied)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return None
    return f"/proc/self/fd/{fd}" if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) else None


def _engine_and_store(spec: RunSpec, component: bool = False) -> tuple[Any, Any]:
    """An engine of ENGINE_SETTINGS and a store with the WASI context and memory limit of `spec`."""
    if os.getpid() == _NO_COMPILE_PID:
        raise RuntimeError("refusing to compile a module in the task server (forked children would hang)")
    import wasmtime

    config = wasmtime.Config()
    for name, value in ENGINE_SETTINGS.items():
        setattr(config, name, value)
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = spec.argv
    wasi.env = split_env(spec.env)
    wasi.inherit_stdin()
    # Preview 2's inherited stdout is Rust's line-buffered one, which nothing flushes before this
    # process's _exit: a component's last output without a newline (or not flushed) was lost, every time
    # in 30 runs. Its file output writes through: none lost in 60. (Preview 1 writes straight to the fd.)
    stdout, stderr = (_reopenable(1), _reopenable(2)) if component else (None, None)
    if stdout:
        wasi.stdout_file = stdout
    else:
        wasi.inherit_stdout()
    if stderr:
        wasi.stderr_file = stderr
    else:
        wasi.inherit_stderr()
    for preopen in spec.preopens:
        try:
            wasi.preopen_dir(preopen.host, preopen.guest, preopen.writable)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"preopening {preopen.host} as {preopen.guest}: {exc}") from None
    store.set_wasi(wasi)
    if spec.memory_limit > 0:
        store.set_limits(memory_size=spec.memory_limit)
    return engine, store


def _instantiation_error(spec: RunSpec, exc: BaseException) -> ModuleError:
    message = _first_line(exc)
    if "exceeds memory limits" in message:
        message += f" (memory limit {spec.memory_limit} bytes = {spec.memory_limit // WASM_PAGE} pages)"
    return ModuleError(f"instantiating {spec.argv[0] if spec.argv else spec.module}: {message}")


def _compile_error(spec: RunSpec, exc: BaseException) -> ModuleError:
    return ModuleError(f"compiling {spec.argv[0] if spec.argv else spec.module}: {_first_line(exc)}")


def _exit_status(start: Any, store: Any) -> int:
    """Run `start` and say what it ended with, as the table above has it (a result: its tag)."""
    import wasmtime

    try:
        result = start(store)
    except ProcExit as exc:
        return proc_exit_status(exc.code)
    except wasmtime.ExitTrap as exc:
        return proc_exit_status(exc.code)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        _stderr(f"wasm trap: {exc}".rstrip() + "\n")
        return TRAP_EXIT_STATUS
    return 1 if getattr(result, "tag", "ok") == "err" else 0


class WasmtimeModule:
    """A module compiled (or deserialized) and instantiated with WASI; `run()` calls `_start`."""

    def __init__(self, spec: RunSpec) -> None:
        engine, self.store = _engine_and_store(spec)
        import wasmtime

        cache = ModuleCache(Path(spec.cache_dir), spec.cache_max_bytes) if spec.cache_dir else None
        try:
            module, self.cache_hit = load_module(engine, Path(spec.module), cache)
        except wasmtime.WasmtimeError as exc:
            raise _compile_error(spec, exc) from None
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        linker.define_func(WASI_MODULE, "proc_exit", wasmtime.FuncType([wasmtime.ValType.i32()], []), _proc_exit)
        try:
            instance = linker.instantiate(self.store, module)
        except ProcExit as exc:  # a start section that exits: nothing left to run
            raise ModuleError(f"module exited with {exc.code} while being instantiated") from None
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise _instantiation_error(spec, exc) from None
        # Not instance.exports(): wasmtime-py wraps every export in Python objects up front (92 ms for
        # a module with 2000 exports); the linker looks up one name in Rust.
        linker.define_instance(self.store, MAIN_INSTANCE, instance)
        try:
            start = linker.get(self.store, MAIN_INSTANCE, spec.entry)
        except wasmtime.WasmtimeError:
            start = None
        if not isinstance(start, wasmtime.Func):
            if spec.entry == DEFAULT_ENTRY:
                raise ModuleError("the module exports no _start function (only WASI commands can run)")
            raise ModuleError(f"the module exports no function {spec.entry!r} (named after '#' in args[0])")
        if start.type(self.store).params:
            raise ModuleError(f"the module's function {spec.entry!r} takes parameters; only one without any can "
                              "be run")
        self.start = start

    def run(self) -> int:
        return _exit_status(self.start, self.store)


class WasmtimeComponent:
    """A component (WASI preview 2) compiled (or deserialized) and instantiated with wasmtime's WASI
    preview 2 host; `run()` calls the `run` function of its `wasi:cli/run` export, as `wasmtime run`
    does: a command's result `ok` is exit code 0, `err` 1; `wasi:cli/exit` ends it with its status."""

    def __init__(self, spec: RunSpec) -> None:
        if spec.entry != DEFAULT_ENTRY:
            raise ModuleError(f"args[0] names the function {spec.entry!r} after '#', but a component runs "
                              f"its {RUN_INTERFACE} export")
        engine, self.store = _engine_and_store(spec, component=True)
        import wasmtime
        import wasmtime.component

        cache = ModuleCache(Path(spec.cache_dir), spec.cache_max_bytes) if spec.cache_dir else None
        try:
            component, self.cache_hit = load_module(engine, Path(spec.module), cache, component=True)
        except wasmtime.WasmtimeError as exc:
            raise _compile_error(spec, exc) from None
        run_interface = next((name for name in component.type.exports(engine)
                              if name.startswith(f"{RUN_INTERFACE}@0.2.")), None)
        if run_interface is None:
            raise ModuleError(f"the component exports no {RUN_INTERFACE}@0.2 (only WASI commands can run)")
        linker = wasmtime.component.Linker(engine)
        linker.add_wasip2()
        if any(name.startswith(HTTP_PACKAGE) for name in component.type.imports(engine)):
            linker.add_wasi_http()
            self.store.set_wasi_http()
        try:
            instance = linker.instantiate(self.store, component)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise _instantiation_error(spec, exc) from None
        interface = instance.get_export_index(self.store, run_interface)
        run = instance.get_export_index(self.store, "run", interface) if interface is not None else None
        self.start = instance.get_func(self.store, run) if run is not None else None
        if self.start is None:
            raise ModuleError(f"the component's {run_interface} export has no run function")
        signature = self.start.type(self.store)
        result = signature.result
        if signature.params or not (isinstance(result, wasmtime.component.ResultType)
                                    and result.ok is None and result.err is None):
            raise ModuleError(f"the component's {run_interface} run function is not `func() -> result`")

    def run(self) -> int:
        return _exit_status(self.start, self.store)


def wasmtime_runnable(spec: RunSpec) -> WasmtimeModule | WasmtimeComponent:
    """What runs `spec.module` under wasmtime: a component or a core module, by its header."""
    with open(spec.module, "rb") as f:
        header = f.read(8)
    return WasmtimeComponent(spec) if header[4:8] == COMPONENT_VERSION else WasmtimeModule(spec)


def _first_line(exc: BaseException) -> str:
    """wasmtime's messages carry a backtrace after the cause; keep the cause."""
    text = str(exc).strip()
    if "Caused by:" in text:
        causes = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines() if line.strip()]
        return "; ".join(line.split(":", 1)[1].strip() if line[:1].isdigit() else line for line in causes)
    return text.splitlines()[0] if text else type(exc).__name__


def _stderr(text: str) -> None:
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


def wasmedge_dirs(preopens: list[Preopen]) -> list[str]:
    """WasmEdge's `--dir guest:host[:readonly]` of each preopen (the other way round from wasmtime). A
    path with a ':' is refused: WasmEdge splits at the first two, so a mount destination `/x:/:` would
    preopen the host's / read-write."""
    dirs = []
    for preopen in preopens:
        for path in (preopen.guest, preopen.host):
            if ":" in path or any(ord(c) < 0x20 for c in path):
                raise InvalidArgument(f"{path!r}: WasmEdge cannot preopen a path with ':' or a control character "
                                      "(use runtime wasmtime)")
        dirs.append(f"{preopen.guest}:{preopen.host}" + ("" if preopen.writable else WASMEDGE_READONLY))
    return dirs


def wasmedge_argv(binary: str, spec: RunSpec) -> list[str]:
    """The WasmEdge command line for `spec` (`wasmedge_dirs` for a read-only rootfs or bind mount too)."""
    argv = [binary]
    for entry in wasmedge_dirs(spec.preopens):
        argv += ["--dir", entry]
    for entry in spec.env:
        argv += ["--env", entry]
    if spec.memory_limit > 0:
        argv += ["--memory-page-limit", str(max(spec.memory_limit // WASM_PAGE, 1))]
    return [*argv, spec.module, *spec.argv[1:]]
