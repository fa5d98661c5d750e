"""Disk tier integrity and durability under injected faults (tensor-level, tiny states, CPU).

Every damaged state file is refused with a `StoreError` (at open, during a verified restore, or by
`DiskStore.get`), never restored as wrong KV; failed, killed and concurrent writes leave one complete
version readable and no temp file behind.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from krul.adapter import ModelAdapter
from krul.restore import BufferCache, DiskSource, open_state_file, restore_into
from krul.store import (MAGIC, PREFIX_NBYTES, CorruptStateError, DiskStore, MissingStateError, StoreError,
                        build_state, deserialize, make_store, serialize)

N = 24
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """(adapter of a 4-layer tiny llama, a state of N tokens: a merge pair (1, 3) plus exact layers)."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    adapter = ModelAdapter(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval(),
                           name="tiny-integrity")
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(1, 1, N, 16, generator=g), torch.randn(1, 1, N, 16, generator=g)) for _ in range(4)]
    state = build_state(adapter.fingerprint(), torch.randint(0, 64, (N,), generator=g), kv, [6, 4, 2, 0],
                        None, pairs=[(1, 3)], method="merge", compress_kwargs={"retain_ratio": 0.2})
    return adapter, state


def _header_len(blob: bytes) -> int:
    return int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")


def _restore(adapter, path):
    restore_into(adapter, DiskSource(path), BufferCache.for_adapter(adapter, N), verify=True)


def _same(a, b) -> bool:
    return serialize(a) == serialize(b)


def test_round_trip_is_exact(tiny, tmp_path):
    """A stored state reads back byte for byte (get) and opens with the same items (open_state_file)."""
    _, state = tiny
    store = DiskStore(tmp_path)
    store.put("c", state)
    assert _same(store.get("c"), state)
    opened = open_state_file(store.path("c"))
    assert [(it.layers, it.start, it.end) for it in opened.state.items] == \
        [(it.layers, it.start, it.end) for it in state.items]
    assert torch.equal(opened.state.token_ids, state.token_ids)


def test_every_header_bit_flip_is_detected(tiny):
    """Flipping any single bit of the prefix or header (one at a time) is a StoreError at parse time."""
    _, state = tiny
    blob = serialize(state)
    end = PREFIX_NBYTES + _header_len(blob)
    buf = bytearray(blob)
    for bit in range(end * 8):
        buf[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(StoreError):
            deserialize(bytes(buf))
        buf[bit // 8] ^= 1 << (bit % 8)


def test_header_bit_flips_are_detected_at_open(tiny, tmp_path):
    """A sample of header bit flips in a file is a StoreError from open_state_file (the restore's parse)."""
    _, state = tiny
    blob = serialize(state)
    end = PREFIX_NBYTES + _header_len(blob)
    path = tmp_path / "s.krul"
    for bit in random.Random(0).sample(range(end * 8), 150):
        buf = bytearray(blob)
        buf[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(buf))
        with pytest.raises(StoreError):
            open_state_file(path)


def test_body_bit_flips_are_detected_by_get_and_verified_restore(tiny, tmp_path):
    """~200 sampled body bit flips: each is a StoreError from DiskStore.get and from a verified restore."""
    adapter, state = tiny
    store = DiskStore(tmp_path, drop_page_cache=False)
    store.put("c", state)
    path = store.path("c")
    blob = path.read_bytes()
    start = PREFIX_NBYTES + _header_len(blob)
    bits = random.Random(1).sample(range(start * 8, len(blob) * 8), 200)
    for k, bit in enumerate(bits):
        buf = bytearray(blob)
        buf[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(buf))
        with pytest.raises(StoreError):
            store.get("c")
        if k % 4 == 0:  # the restore path too (a quarter of them: each restore starts threads)
            with pytest.raises(StoreError):
                _restore(adapter, path)
    path.write_bytes(blob)
    _restore(adapter, path)  # the intact file restores


def test_swapping_two_layers_entries_in_the_header_is_detected(tiny, tmp_path):
    """Swapping two items' layer entries in the header (the review's wrong-layer KV) is a StoreError."""
    adapter, state = tiny
    blob = serialize(state)
    n = _header_len(blob)
    header = json.loads(blob[PREFIX_NBYTES:PREFIX_NBYTES + n])
    exact = [it for it in header["items"] if it["method"] == "exact"]
    exact[0]["layers"], exact[1]["layers"] = exact[1]["layers"], exact[0]["layers"]
    new = json.dumps(header).encode()
    forged = MAGIC + len(new).to_bytes(8, "little") + blob[len(MAGIC) + 8:PREFIX_NBYTES] + new + blob[PREFIX_NBYTES + n:]
    path = tmp_path / "s.krul"
    path.write_bytes(forged)
    with pytest.raises(StoreError, match="header checksum"):
        open_state_file(path)
    with pytest.raises(StoreError, match="header checksum"):
        deserialize(forged)
    with pytest.raises(StoreError):
        _restore(adapter, path)


def test_schema_is_validated_even_with_a_matching_checksum(tiny, forge_header):
    """A header re-checksummed after an edit (a bug, not a bit flip) is still refused by the schema."""
    _, state = tiny
    blob = serialize(state)

    edits = [lambda h: h["items"][0].update(layers=[7, 9]),  # layer out of range
             lambda h: h["items"][-1].update(end=N + 5),  # token range past the history
             lambda h: h["tensors"]["0.k_dir"].update(offset=10 ** 9),  # outside the body
             lambda h: h["tensors"]["0.k_dir"].update(dtype="complex64"),
             lambda h: h["tensors"]["0.k_dir"].update(shape=[1, 2]),  # nbytes vs shape
             lambda h: h.pop("body_sha256"),
             lambda h: h.update(body_sha256=""),  # an empty checksum is corruption
             lambda h: h.update(body_nbytes=h["body_nbytes"] - 1),  # length vs file size
             lambda h: h.update(format=1),
             lambda h: h["items"][0].pop("keys"),
             lambda h: h.update(items="x")]
    for edit in edits:
        with pytest.raises(CorruptStateError):
            deserialize(forge_header(blob, edit))


def test_old_format_and_garbage_are_refused_clearly():
    """A format-1 file and bytes that are no krul state are StoreErrors saying so and what to do."""
    with pytest.raises(StoreError, match="format 1.*delete"):
        deserialize(b"KRULSTATE1\n" + bytes(64))
    with pytest.raises(StoreError, match="not a krul state"):
        deserialize(b"hello")


def test_truncation_at_16_points_is_detected(tiny, tmp_path):
    """The file cut at 16 points (prefix, header, body, one byte short) is a StoreError at open and get."""
    _, state = tiny
    store = DiskStore(tmp_path, drop_page_cache=False)
    store.put("c", state)
    path = store.path("c")
    blob = path.read_bytes()
    points = sorted({0, 5, len(MAGIC) + 3, PREFIX_NBYTES - 1, PREFIX_NBYTES + 10, len(blob) - 1}
                    | {len(blob) * k // 11 for k in range(1, 11)})
    assert len(points) == 16
    for cut in points:
        path.write_bytes(blob[:cut])
        with pytest.raises(StoreError):
            open_state_file(path)
        with pytest.raises(StoreError):
            store.get("c")


def test_deleted_file_is_a_clear_error_naming_the_key(tiny, tmp_path):
    """A state whose file is gone is a MissingStateError (a StoreError) naming the conversation."""
    _, state = tiny
    store = DiskStore(tmp_path)
    store.put("conv-7", state)
    os.unlink(store.path("conv-7"))
    with pytest.raises(MissingStateError, match="conv-7"):
        store.get("conv-7")
    with pytest.raises(MissingStateError, match="does not exist"):
        open_state_file(store.path("conv-7"))
    store.put("conv-8", state)
    store.delete("conv-8")
    assert "conv-8" not in store
    with pytest.raises(StoreError, match="conv-8"):
        store.get("conv-8")


def _temps(root: Path) -> list[Path]:
    return list(root.glob("*.tmp"))


def test_enospc_leaves_the_previous_version_and_no_temp(tiny, tmp_path, monkeypatch):
    """A write failing with ENOSPC part-way is a StoreError; no temp file remains; the old version reads."""
    _, state = tiny
    store = DiskStore(tmp_path)
    store.put("c", state)
    calls = []
    real_write = os.write

    def full(fd, data):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[:100])  # a partial write first

    monkeypatch.setattr(os, "write", full)
    other = build_state(state.fingerprint, state.token_ids, [(torch.zeros(1, 1, N, 16),) * 2] * 4, [0] * 4, None)
    with pytest.raises(StoreError, match="No space left"):
        store.put("c", other)
    monkeypatch.undo()
    assert not _temps(tmp_path)
    assert _same(store.get("c"), state)


def _run(code: str, *args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


_BIG_WRITER = """
    import sys, torch
    from krul.store import DiskStore, build_state
    n = int(sys.argv[2])
    kv = [(torch.randn(1, 8, n, 128), torch.randn(1, 8, n, 128)) for _ in range(4)]
    state = build_state({"model": "big"}, torch.arange(n), kv, [0] * 4, None)
"""


def test_file_size_limit_leaves_the_previous_version_and_no_temp(tiny, tmp_path):
    """Under RLIMIT_FSIZE (SIGXFSZ ignored) a too-big write is a StoreError; no temp; the old version reads."""
    _, state = tiny
    DiskStore(tmp_path).put("c", state)
    out = _run(_BIG_WRITER + """
    import resource, signal
    from krul.store import StoreError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        DiskStore(sys.argv[1]).put("c", state)
    except StoreError as exc:
        print("STOREERROR", exc)
    """, tmp_path, 64)
    assert "STOREERROR" in out.stdout and "previous version" in out.stdout, out.stdout + out.stderr
    assert not _temps(tmp_path)
    assert _same(DiskStore(tmp_path).get("c"), state)


def test_sigkill_mid_write_keeps_the_previous_version_and_the_temp_is_swept(tiny, tmp_path):
    """A writer killed after creating its temp file leaves the old version readable; the next open
    sweeps the temp."""
    _, state = tiny
    DiskStore(tmp_path).put("c", state)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_BIG_WRITER + """
    import os, time
    real = os.write
    def slow(fd, data):
        time.sleep(0.05)
        return real(fd, bytes(data[:1 << 16]))
    os.write = slow
    DiskStore(sys.argv[1]).put("c", state)
    """), str(tmp_path), "64"], env=ENV)
    try:
        deadline = time.time() + 30
        while not _temps(tmp_path) and time.time() < deadline and writer.poll() is None:
            time.sleep(0.01)
        assert _temps(tmp_path), "the writer never created its temp file"
        time.sleep(0.1)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert _temps(tmp_path)  # left by the killed writer
    assert _same(DiskStore(tmp_path).get("c"), state)
    assert not _temps(tmp_path)


def test_sweep_spares_a_live_writers_temp(tiny, tmp_path):
    """A store opening the folder while a write holds the key's lock leaves that writer's temp alone."""
    _, state = tiny
    store = DiskStore(tmp_path)
    name = store.path("c").name
    lock = store._lock(name)
    tmp = tmp_path / f".{name}.abc_123.tmp"
    tmp.write_bytes(b"partial")
    try:
        assert DiskStore(tmp_path).swept == [] and tmp.exists()
    finally:
        os.close(lock)
    assert DiskStore(tmp_path).swept == [tmp] and not tmp.exists()


def test_two_writer_processes_on_one_key_leave_one_complete_version(tiny, tmp_path):
    """Two processes writing one key 15 times each (and a reader meanwhile): every read and the final
    file are one complete, valid version of one of the writers."""
    _, state = tiny
    code = """
    import sys, torch
    from krul.store import DiskStore, build_state
    w = int(sys.argv[2])
    store = DiskStore(sys.argv[1])
    for i in range(15):
        kv = [(torch.full((1, 1, 64, 16), float(w * 100 + i)),) * 2 for _ in range(4)]
        store.put("c", build_state({"model": "w"}, torch.arange(64), kv, [0] * 4, None, meta={"w": w, "i": i}))
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(tmp_path), str(w)], env=ENV)
             for w in (1, 2)]
    store = DiskStore(tmp_path)
    reads = 0
    while any(p.poll() is None for p in procs):
        try:
            got = store.get("c")
        except MissingStateError:
            continue
        value = float(got.items[0].payload.keys.flatten()[0])
        assert value == got.meta["w"] * 100 + got.meta["i"]
        assert all(torch.equal(it.payload.keys, torch.full_like(it.payload.keys, value)) for it in got.items)
        reads += 1
    assert [p.wait() for p in procs] == [0, 0]
    final = store.get("c")
    assert final.meta["i"] == 14 and final.meta["w"] in (1, 2)
    assert not _temps(tmp_path)


def test_a_given_root_persists_across_processes(tiny, tmp_path):
    """A state put by one process under a given root is read by a later process; the folder stays."""
    _, state = tiny
    out = _run("""
    import sys, torch
    from krul.store import make_store, build_state
    kv = [(torch.ones(1, 1, 5, 4) * l,) * 2 for l in range(3)]
    make_store("disk", sys.argv[1]).put("conv", build_state({"model": "p"}, torch.arange(5), kv, [0] * 3, None))
    """, tmp_path / "states")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "states").is_dir()
    got = make_store("disk", tmp_path / "states").get("conv")
    assert got.n_tokens == 5 and float(got.items_for_layer(2)[0].payload.keys[0, 0, 0, 0]) == 2.0
    temp = _run("""
    from krul.store import make_store
    print(make_store("disk").root)
    """)
    assert temp.returncode == 0 and not Path(temp.stdout.strip()).exists()  # the temporary tier is removed


def test_random_header_edits_under_a_valid_checksum_only_raise_store_errors(tiny, tmp_path):
    """800 random edits of header fields (values swapped for wrong types, ranges, deletions),
    re-checksummed: deserialize and open_state_file raise StoreError or succeed, nothing else."""
    import hashlib

    _, state = tiny
    blob = serialize(state)
    n = _header_len(blob)
    body = blob[PREFIX_NBYTES + n:]
    original = json.loads(blob[PREFIX_NBYTES:PREFIX_NBYTES + n])

    def paths(o, p=()):
        yield p
        children = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in children:
            yield from paths(v, p + (k,))

    where = list(paths(original))[1:]
    values = [None, True, -1, 0, 1, 3, 7, N, N + 1, 10 ** 12, 1.5, "x", "", [], {}, [0], [1, 3], [3, 1],
              "float32", "complex64"]
    rng = random.Random(2)
    path = tmp_path / "s.krul"
    for _ in range(800):
        h = json.loads(json.dumps(original))
        for _ in range(rng.choice([1, 1, 2])):
            p = rng.choice(where)
            try:
                o = h
                for k in p[:-1]:
                    o = o[k]
                if isinstance(o, dict) and rng.random() < 0.15:
                    del o[p[-1]]
                else:
                    o[p[-1]] = rng.choice(values)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit removed or replaced the path
        new = json.dumps(h).encode()
        head = MAGIC + len(new).to_bytes(8, "little")
        forged = head + hashlib.sha256(head + new).digest() + new + body
        path.write_bytes(forged)
        for parse in (lambda: deserialize(forged), lambda: open_state_file(path)):
            try:
                parse()
            except StoreError:
                pass
