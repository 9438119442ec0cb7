"""Compiled trees: a LightGBM model as native code (lleaves' tree compiler, on LLVM), giving
bit for bit the booster's probabilities at several times its speed on big batches.

Compiling takes ~10 s for a model of ~150 trees, so the object code is cached on disk under
the model's content hash and each model compiles once; loading a cached one takes milliseconds:

    <cache_dir>/<key>.o       the object code lleaves emitted for this machine's CPU
    <cache_dir>/<key>.json    what it is: the object's sha256, the versions and CPU it was built for

``key`` hashes the model's text and everything the code depends on (lleaves and llvmlite
versions, the CPU and its features, the compile options). Loading object code runs it, so
an entry whose object does not match the sha256 beside it (a torn write, a copy from
another machine, a bit flip) is compiled again, never loaded.

Equal by construction, and checked before use: the compiled trees predict a probe (every
split threshold of every feature as float32, the float32 numbers on either side of it,
NaN, infinities, zeros, tiny values; plus rows of the data about to be scored, when given)
and must give exactly the booster's numbers; otherwise :func:`compile_lightgbm` raises and
the caller keeps the booster. Two details make them exact. The sum over trees runs in the
booster's order: lleaves' own entry point sums each block of 34 trees from zero and then
adds the block to the running total (an ulp off), so the entry point here is generated
anew, carrying the running total from block to block (blocks keep the trees' code in the
instruction cache: 1.9x the speed of one block of all trees). And inputs within LightGBM's
zero threshold (``1e-35f``) read as 0, as LightGBM's own row reader does.

XGBoost keeps ``inplace_predict``: treelite 4.8.1 with tl2cgen 1.0.0 compiles XGBoost 3.2
models here, but its probabilities are not XGBoost's (89 % of rows differ, by up to 6.6e-7 on
an open model and 1.3e-6 on a churn model; margins by 1e-5), and per CPU second it was 1.2x
``inplace_predict`` on the open model (160 trees) and 0.7x on the churn model (297 trees).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata as md
import json
import logging
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CompilationError", "CompiledTrees", "ZERO_THRESHOLD", "cache_key", "compile_lightgbm", "probe_rows",
           "reads_as_zero"]

log = logging.getLogger(__name__)

# LightGBM's kZeroThreshold (a float): its row reader drops inputs with |x| <= it, so they read as 0
ZERO_THRESHOLD = float(np.float32(1e-35))
# rows per call into the native code: a float64 copy of this many rows stays in cache
_CHUNK_ROWS = 4096
_PROBE_ROWS = 4096
# entries kept in a cache folder, the most recently used (~0.4 MB each); an evicted model compiles again
_KEEP_ENTRIES = 16


class CompilationError(RuntimeError):
    """The model could not be compiled, or its compiled trees disagree with the booster."""


def reads_as_zero(values: np.ndarray) -> bool:
    """Whether any value is not zero yet within LightGBM's zero threshold (so LightGBM reads
    it as 0 and the compiled trees must be told): a scan of the bits, no float temporaries.
    A caller that knows its inputs have none passes ``clean=True`` to :meth:`CompiledTrees.predict`."""
    values = np.asarray(values)   # any memory order: a view of the same item size needs none
    if values.dtype == np.float32:
        bits, limit = values.view(np.uint32) & np.uint32(0x7FFFFFFF), np.float32(ZERO_THRESHOLD).view(np.uint32)
    else:
        values = values.astype(np.float64, copy=False)
        bits, limit = values.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF), np.float64(ZERO_THRESHOLD).view(np.uint64)
    bits -= 1   # zero wraps to the largest number: only 0 < |x| <= threshold stays below the limit
    return bool((bits < limit).any())


def _host() -> dict[str, str]:
    import llvmlite.binding as llvm

    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:   # LLVM cannot always tell; lleaves then compiles for none
        features = ""
    return {"cpu": llvm.get_host_cpu_name(), "cpu_features": features,
            "lleaves": md.version("lleaves"), "llvmlite": md.version("llvmlite")}


def cache_key(model_text: str, host: dict[str, str] | None = None) -> str:
    """The content hash naming a model's cache entry: the model and what its code depends on."""
    digest = hashlib.sha256(model_text.encode())
    digest.update(json.dumps({**(host or _host()), "options": _OPTIONS}, sort_keys=True).encode())
    return digest.hexdigest()[:40]


# blocks of trees (instruction-cache blocking) summed in the booster's order; the entry
# point's layout is part of the key, so a change here compiles models anew
_BLOCK_TREES = 34
_OPTIONS = {"entry": "sequential-sum-v1", "block_trees": _BLOCK_TREES, "codemodel": "large", "inline": True,
            "float": "f64"}
_ENTRY = "sendtime_forest"


class CompiledTrees:
    """A compiled LightGBM model: ``predict`` answers ``booster.predict(x)`` (probabilities)."""

    def __init__(self, engine: Any, key: str, n_features: int) -> None:
        # the engine owns the code: keep it alive as long as the entry point
        self._engine, self.key, self.n_features = engine, key, n_features
        address = engine.get_function_address(_ENTRY)
        c_double_p = ctypes.POINTER(ctypes.c_double)
        # a ctypes call releases the GIL: chunks run on parallel threads
        self._entry = ctypes.CFUNCTYPE(None, c_double_p, c_double_p, ctypes.c_int32, ctypes.c_int32)(address)

    def predict(self, x: np.ndarray, threads: int = 1, overwrite_input: bool = False,
                clean: bool = False) -> np.ndarray:
        """Probabilities of the rows of ``x`` (any float dtype), in chunks over ``threads``
        threads (the native code releases the GIL). ``overwrite_input``: ``x`` is float64 and
        may be changed (inputs within the zero threshold set to 0), saving a copy; ``clean``:
        ``x`` has no such input (:func:`reads_as_zero` said so), saving the scan."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"compiled trees take (n, {self.n_features}) rows, got {x.shape}")
        out = np.empty(len(x), dtype=np.float64)
        starts = range(0, len(x), _CHUNK_ROWS)

        def one(start: int) -> None:
            stop = min(start + _CHUNK_ROWS, len(x))
            out[start:stop] = self._predict_chunk(x[start:stop], overwrite_input, clean)

        if threads <= 1 or len(starts) <= 1:
            for start in starts:
                one(start)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(one, starts))
        return out

    def _predict_chunk(self, chunk: np.ndarray, overwrite_input: bool, clean: bool) -> np.ndarray:
        ready = chunk.dtype == np.float64 and chunk.flags.c_contiguous
        own = ready and (overwrite_input or clean)
        x64 = chunk if own else np.array(chunk, dtype=np.float64, order="C")
        if not clean:
            np.copyto(x64, 0.0, where=np.abs(x64) <= ZERO_THRESHOLD)   # -0.0 and denormals become 0
        out = np.empty(len(x64), dtype=np.float64)
        c_double_p = ctypes.POINTER(ctypes.c_double)
        self._entry(x64.ctypes.data_as(c_double_p), out.ctypes.data_as(c_double_p), 0, len(x64))
        return out


def _forest_ir(model_file: Path) -> str:
    """LLVM IR of the model: lleaves' code for each tree, and an entry point that runs the
    rows block by block of trees, adding each tree's value to the row's running total in
    the trees' order (the booster's sum), then the binary objective's sigmoid as LightGBM
    computes it: 1 / (1 + exp(-alpha * score))."""
    from lleaves.compiler.ast import parse_to_ast
    from lleaves.compiler.codegen.codegen import gen_tree
    from llvmlite import ir

    forest = parse_to_ast(str(model_file))
    if forest.n_classes != 1 or forest.objective_func != "binary" or forest.average_output:
        raise CompilationError(f"only binary models compile here, not {forest.objective_func!r} "
                               f"with {forest.n_classes} classes")
    alpha = float(str(forest.objective_func_config).split(":")[1])
    double, i32, i64 = ir.DoubleType(), ir.IntType(32), ir.IntType(64)
    module = ir.Module(name="forest")
    trees = []
    for tree in forest.trees:
        kinds = [i32 if f.is_categorical else double for f in tree.features]
        function = ir.Function(module, ir.FunctionType(double, kinds), name=str(tree))
        function.linkage = "private"
        gen_tree(tree, function, True)
        trees.append(function)
    entry = ir.Function(module, ir.FunctionType(ir.VoidType(), (double.as_pointer(), double.as_pointer(), i32, i32)),
                        name=_ENTRY)
    data, out, start, end = entry.args
    builder = ir.IRBuilder(entry.append_basic_block("setup"))
    first, last = builder.zext(start, i64), builder.zext(end, i64)
    row = builder.alloca(i64, name="row")
    blocks = [trees[i:i + _BLOCK_TREES] for i in range(0, len(trees), _BLOCK_TREES)]
    exp = module.declare_intrinsic("llvm.exp", [double])
    for b, block in enumerate(blocks):
        builder.store(first, row)
        test = entry.append_basic_block(f"test{b}")
        body = entry.append_basic_block(f"body{b}")
        done = entry.append_basic_block(f"done{b}")
        builder.branch(test)
        builder = ir.IRBuilder(test)
        i = builder.load(row)
        builder.cbranch(builder.icmp_signed("<", i, last), body, done)
        builder = ir.IRBuilder(body)
        i = builder.load(row)
        base = builder.mul(i, ir.Constant(i64, forest.n_args))
        args = []
        for k, feature in enumerate(forest.features):
            value = builder.load(builder.gep(data, [builder.add(base, ir.Constant(i64, k))]))
            if feature.is_categorical:   # as lleaves: NaN goes right, others to their integer
                nan = builder.fcmp_unordered("uno", value, ir.Constant(double, 0.0))
                value = builder.select(nan, ir.Constant(i32, -(2 ** 31)), builder.fptosi(value, i32))
            args.append(value)
        slot = builder.gep(out, [i])
        total = ir.Constant(double, 0.0) if b == 0 else builder.load(slot)
        for function in block:
            total = builder.fadd(total, builder.call(function, args))
        if b == len(blocks) - 1:
            scaled = builder.fmul(ir.Constant(double, -alpha), total)
            total = builder.fdiv(ir.Constant(double, 1.0),
                                 builder.fadd(ir.Constant(double, 1.0), builder.call(exp, [scaled])))
        builder.store(total, slot)
        builder.store(builder.add(i, ir.Constant(i64, 1)), row)
        builder.branch(test)
        builder = ir.IRBuilder(done)
    builder.ret_void()
    return str(module)


def _compile(model_file: Path, cache: Path | None) -> Any:
    """An execution engine holding the model's code: compiled (and written to ``cache``) or,
    when ``cache`` exists, loaded from it."""
    import llvmlite.binding as llvm
    from lleaves.llvm_binding import compile_module_to_asm

    if cache is not None and cache.exists():
        return compile_module_to_asm(llvm.parse_assembly(""), str(cache))
    module = llvm.parse_assembly(_forest_ir(model_file))
    module.verify()
    passes = llvm.PassManagerBuilder()
    passes.opt_level = 3
    passes.inlining_threshold = 1   # as lleaves: inline the trees into the entry point
    manager = llvm.ModulePassManager()
    passes.populate(manager)
    manager.run(module)
    return compile_module_to_asm(module, str(cache) if cache is not None else None)


def probe_rows(model_text: str, n_features: int, n_rows: int = _PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Rows whose every value sits where trees decide: each split threshold of the feature
    rounded to float32, the float32 neighbours on both sides, zeros, NaN, infinities, tiny
    values; drawn independently per feature so the rows walk many paths."""
    thresholds: list[list[float]] = [[] for _ in range(n_features)]
    features: list[int] = []
    for line in model_text.splitlines():
        if line.startswith("split_feature="):
            features = [int(v) for v in line.split("=", 1)[1].split()]
        elif line.startswith("threshold=") and features:
            for f, t in zip(features, line.split("=", 1)[1].split()):
                thresholds[f].append(float(t))
            features = []
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-36, -1e-36, ZERO_THRESHOLD, 1.0, -1.0],
                       dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n_rows, n_features), dtype=np.float32)
    with np.errstate(over="ignore"):
        for j in range(n_features):
            t = np.asarray(thresholds[j], dtype=np.float64).astype(np.float32)
            values = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf)),
                                     special])
            out[:, j] = rng.choice(values, n_rows)
    return out


def _same(a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    if not differ.any():
        return True, ""
    with np.errstate(invalid="ignore"):
        gap = np.nanmax(np.abs(a - b)) if (~np.isnan(a - b)).any() else float("nan")
    return False, f"{int(differ.sum())} of {len(a)} probe rows differ (largest gap {gap:.3g})"


def _write_entry(cache_dir: Path, key: str, compile_to: Any, host: dict[str, str]) -> Path:
    """Compile into a temporary file, then move it in place with its sidecar (readers see a
    whole entry or none)."""
    obj = cache_dir / f"{key}.o"
    tmp = cache_dir / f".{key}.{uuid.uuid4().hex[:8]}.o.tmp"
    try:
        compile_to(tmp)
        data = tmp.read_bytes()
        meta = {"sha256": hashlib.sha256(data).hexdigest(), **host, "options": _OPTIONS}
        side = cache_dir / f".{key}.{uuid.uuid4().hex[:8]}.json.tmp"
        side.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, obj)
        os.replace(side, cache_dir / f"{key}.json")
    finally:
        tmp.unlink(missing_ok=True)
    return obj


def _prune(cache_dir: Path) -> None:
    """Drop the least recently used entries beyond :data:`_KEEP_ENTRIES` (use touches them)."""
    entries = sorted(cache_dir.glob("*.o"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[_KEEP_ENTRIES:]:
        for path in (old, old.with_suffix(".json")):
            path.unlink(missing_ok=True)


def _valid_entry(cache_dir: Path, key: str) -> bool:
    obj, side = cache_dir / f"{key}.o", cache_dir / f"{key}.json"
    if not obj.exists():
        return False
    try:
        meta = json.loads(side.read_text())
        ok = meta.get("sha256") == hashlib.sha256(obj.read_bytes()).hexdigest()
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("compiled-trees cache entry %s is damaged (its object does not match its sha256): "
                    "compiling again", obj)
    return ok


def compile_lightgbm(booster: Any, cache_dir: str | Path, sample: np.ndarray | None = None,
                     model_text: str | None = None) -> CompiledTrees:
    """The compiled trees of a LightGBM booster, from the cache or compiled into it, checked
    against the booster on :func:`probe_rows` and ``sample`` (rows of real data).

    Raises :class:`CompilationError` when compiling fails or the numbers differ in any bit.
    """
    text = model_text if model_text is not None else booster.model_to_string()
    n_features = booster.num_feature()
    host = _host()
    key = cache_key(text, host)
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        workspace = tempfile.TemporaryDirectory(dir=cache_dir, prefix=".model-")
    except OSError as exc:
        raise CompilationError(f"no cache for compiled trees at {cache_dir}: {exc}") from exc
    with workspace as tmp:
        model_file = Path(tmp) / "model.txt"
        model_file.write_text(text)
        try:
            if not _valid_entry(cache_dir, key):
                log.info("compiling %d trees into native code (once per model; cached in %s)",
                         booster.num_trees(), cache_dir)
                _write_entry(cache_dir, key, lambda path: _compile(model_file, path), host)
                _prune(cache_dir)
            else:
                os.utime(cache_dir / f"{key}.o")
            compiled = CompiledTrees(_compile(model_file, cache_dir / f"{key}.o"), key, n_features)
        except CompilationError:
            raise
        except Exception as exc:   # LLVM and lleaves raise many kinds; any of them means "not compiled"
            raise CompilationError(f"the model could not be compiled: {type(exc).__name__}: {exc}") from exc
    probe = probe_rows(text, n_features)
    if sample is not None and len(sample):
        probe = np.vstack([probe, np.asarray(sample, dtype=np.float32)[:_PROBE_ROWS]])
    same, why = _same(compiled.predict(probe), booster.predict(probe, num_threads=1))
    if not same:
        raise CompilationError(f"compiled trees disagree with the booster: {why}")
    return compiled
