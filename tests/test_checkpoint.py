"""Checkpoints against hostile files, killed saves and large models: every hostile file is a
ValueError that names the problem before any large allocation, temporaries of killed saves
are cleaned up, and save and load hold no second copy of the state.

(The round trips, the bit-identical resumes and the table of corrupted files are in
test_toolkit.py.)"""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib

import numpy as np
import pytest

import fastopt
from conftest import UNDER_ASAN
from test_toolkit import _checkpoint_bytes, _rewrite, assert_unchanged, fill_grads, make, \
    snapshot

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- building hostile zips ----------------------------------------------------------------

def _members(data):
    """[(name, bytes)] of a zip's members, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _zip(members):
    """A zip of [(name, bytes)], stored and small (32-bit size fields); a name given twice is
    written twice (zipfile warns)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, b in members:
            z.writestr(name, b)
    return out.getvalue()


def _replace(data, name, payload):
    return _zip([(n, payload if n == name else b) for n, b in _members(data)])


def _npy(shape, descr="<f4", data=b""):
    """A .npy header declaring `shape` of `descr`, followed by `data` (however short)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


# offset and struct format of the fields of a local header and of a central directory entry
_LOCAL = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "csize": (18, "<I"),
          "usize": (22, "<I")}
_CENTRAL = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"),
            "usize": (24, "<I")}


def _patch(data, name, **fields):
    """Overwrite header fields of member `name` (a small zip from _zip) in both its local
    header and its central directory entry; "flags" is or-ed in."""
    b = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        local = z.getinfo(name).header_offset
    raw = name.encode()
    central = next(i for i in range(len(b)) if b[i:i + 4] == b"PK\x01\x02"
                   and b[i + 46:i + 46 + len(raw)] == raw)
    for base, table in ((local, _LOCAL), (central, _CENTRAL)):
        for field, value in fields.items():
            off, fmt = table[field]
            if field == "flags":
                value |= struct.unpack_from(fmt, b, base + off)[0]
            struct.pack_into(fmt, b, base + off, value)
    return bytes(b)


def _deflate_bomb(data, name, n_floats):
    """Member `name` becomes a .npy of n_floats zeros, deflated to about 1 KB a MiB: identical
    fully-flushed deflate blocks repeated, so building it costs no memory; its CRC is wrong
    (only reading all of it would notice)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    header = _npy((n_floats,))
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    raw = head + block * (n_floats * 4 >> 20) + c.flush()
    out = _replace(data, name, raw)
    return _patch(out, name, method=zipfile.ZIP_DEFLATED, usize=len(header) + 4 * n_floats)


def _meta(data, text):
    return _replace(data, "meta.npy", _npy_of(np.array(text)))


def _npy_of(a):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


HOSTILE = [
    ("deflate bomb: 2 MB declaring 2**29 floats",
     lambda d: _deflate_bomb(d, "param/0.npy", 2 ** 29),
     r"param/0 declares 2147483776 bytes, but may hold at most 840 bytes"),
    ("npy header declaring 2**29 floats",
     lambda d: _replace(d, "param/0.npy", _npy((2 ** 29,), data=bytes(16))),
     r"param/0 has shape \(536870912,\), expected \(30, 7\)"),
    ("4 KB file declaring 2**40 elements",
     lambda d: _replace(d, "state/2/exp_avg.npy", _npy((2 ** 20, 2 ** 20))),
     r"state/2/exp_avg has shape \(1048576, 1048576\), expected \(129,\)"),
    ("zip declares 4 GB of a member",
     lambda d: _patch(_zip(_members(d)), "param/1.npy", usize=2 ** 32 - 16),
     r"param/1 declares 4294967280 bytes"),
    ("format_version declares 2**28 int64",
     lambda d: _replace(d, "format_version.npy", _npy((2 ** 28,), "<i8")),
     r"format_version holds \(268435456,\) of int64, more than the 8 bytes"),
    ("meta of 16 MB",
     lambda d: _meta(d, json.dumps({"junk": "x" * (4 << 20)})),
     r"meta declares \d+ bytes, but may hold at most \d+"),
    ("meta nested 100,000 deep",
     lambda d: _meta(d, "[" * 100_000 + "]" * 100_000),
     r"meta is nested too deeply"),
    ("compression method 99",
     lambda d: _patch(_zip(_members(d)), "param/2.npy", method=99),
     r"member 'param/2.npy' uses compression method 99"),
    ("encrypted member",
     lambda d: _patch(_zip(_members(d)), "state/1/exp_avg.npy", flags=0x1),
     r"member 'state/1/exp_avg.npy' is encrypted"),
    ("two members of one name",
     lambda d: _zip(_members(d) + [("param/0.npy", _npy_of(np.zeros((30, 7), np.float32)))]),
     r"member 'param/0.npy' appears twice"),
    ("/dev/zero", None, r"not a regular file"),
]
BUILD = {name: build for name, build, _ in HOSTILE}

# Loads every hostile file into one Adam (the configuration _checkpoint_bytes saves) with the
# address space limited to what the process has plus 256 MB: a large allocation is a
# MemoryError, which the test reports as the failure it is.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import fastopt
    rng = np.random.default_rng(5)
    ps = [rng.standard_normal(s).astype(np.float32) for s in [(30, 7), (7,), (129,), (3, 3, 3)]]
    opt = fastopt.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], amsgrad=True)
    for g in opt.grads:
        g[...] = 1.0
    opt.step()
    before = [opt.flat_params.copy()] + [a.copy() for _, b in opt.state_buffers()
                                                  for a in b.arrays()]
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
    out = {}
    for case, path in json.loads(sys.argv[1]):
        try:
            opt.load(path)
            got = ["loaded", ""]
        except BaseException as e:
            got = [type(e).__name__, str(e)[:500]]
        after = [opt.flat_params] + [a for _, b in opt.state_buffers() for a in b.arrays()]
        got.append(all(np.array_equal(a, b) for a, b in zip(before, after)))
        out[case] = got
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    good = _checkpoint_bytes()
    cases = []
    for i, (name, build, _) in enumerate(HOSTILE):
        if build is None:
            cases.append((name, "/dev/zero"))
            continue
        path = folder / f"case{i}.npz"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)      # zipfile's "Duplicate name"
            path.write_bytes(build(good))
        cases.append((name, str(path)))
    script = folder / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name,match", [(c[0], c[2]) for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_hostile_files_are_refused_before_any_large_allocation(hostile_results, name, match):
    import re
    kind, message, unchanged = hostile_results[name]
    assert kind == "ValueError", (kind, message)
    assert re.search(match, message), message
    assert unchanged


def test_the_hostile_zips_are_what_they_claim():
    """The builders above make what their names say (else the refusals prove nothing)."""
    good = _checkpoint_bytes()
    with zipfile.ZipFile(io.BytesIO(_deflate_bomb(good, "param/0.npy", 2 ** 29))) as z:
        info = z.getinfo("param/0.npy")
        assert info.file_size == 2 ** 31 + 128 and info.compress_size < 3 << 20
        with z.open(info) as f:
            head = f.read(1 << 20)
        assert np.lib.format.read_magic(io.BytesIO(head)) == (1, 0)
        assert not any(head[128:])
    with pytest.warns(UserWarning, match="Duplicate name"):
        dup = BUILD["two members of one name"](good)
    with zipfile.ZipFile(io.BytesIO(dup)) as z:
        assert [i.filename for i in z.infolist()].count("param/0.npy") == 2
    with zipfile.ZipFile(io.BytesIO(BUILD["compression method 99"](good))) as z:
        with pytest.raises(NotImplementedError):
            z.read("param/2.npy")
    with zipfile.ZipFile(io.BytesIO(BUILD["encrypted member"](good))) as z:
        with pytest.raises(RuntimeError, match="encrypted"):
            z.read("state/1/exp_avg.npy")


def test_step_counts_past_int64_are_refused_for_sgd_too(tmp_path):
    """An SGD checkpoint with steps=[10**30] once loaded, and every step() then raised an
    OverflowError."""
    opt = fastopt.SGD([np.ones(5, np.float32)], lr=0.1, momentum=0.9)
    opt.step()
    path = tmp_path / "ck.npz"
    opt.save(path)

    def steps(m):
        meta = json.loads(str(m["meta"][()]))
        meta["steps"] = [10 ** 30]
        m["meta"] = np.array(json.dumps(meta))
    path.write_bytes(_rewrite(path.read_bytes(), steps))
    other = fastopt.SGD([np.zeros(5, np.float32)], lr=0.1, momentum=0.9)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="bad step counts"):
        other.load(path)
    assert_unchanged(other, snap)
    other.step()


def _large_last_member_opt(seed):
    """An AdamW whose last member (exp_avg_sq of its last param) is 1.2 MB: larger than the
    read-ahead of a header, so its CRC is only checked by reading its data."""
    rng = np.random.default_rng(seed)
    opt = fastopt.AdamW([rng.standard_normal(s).astype(np.float32) for s in [(7,), (300, 1000)]])
    fill_grads(opt, seed)
    opt.step()
    return opt


def _chained(opt, steps):
    from fastopt.lr_scheduler import ChainedScheduler, ExponentialLR, StepLR
    sched = ChainedScheduler([ExponentialLR(opt, 0.9), StepLR(opt, 2, 0.5)])
    for _ in range(steps):
        sched.step()
    return sched


def test_a_corrupted_last_member_is_refused_and_changes_nothing(tmp_path):
    """The CRC is verified after every other check, the scheduler's included: neither the
    optimizer nor the scheduler (nor a ChainedScheduler's members, which the scheduler check
    once loaded for real) may have changed."""
    path = tmp_path / "ck.npz"
    saved = _large_last_member_opt(1)
    saved.save(path, _chained(saved, 5))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        last = z.infolist()[-1]
    assert last.filename == "state/1/exp_avg_sq.npy" and last.file_size > 1 << 20
    # its data ends where the central directory starts (offset 16 of the end record)
    end = struct.unpack_from("<I", data, len(data) - 22 + 16)[0]
    data[end - 5] ^= 0x40
    path.write_bytes(bytes(data))
    opt = _large_last_member_opt(2)
    sched = _chained(opt, 1)
    snap, sched_before = snapshot(opt), json.dumps(sched.state_dict())
    with pytest.raises(ValueError, match=r"state/1/exp_avg_sq.npy' is corrupted \(CRC"):
        opt.load(path, sched)
    assert_unchanged(opt, snap)
    assert json.dumps(sched.state_dict()) == sched_before


def test_the_file_is_a_plain_npz_and_an_np_savez_one_loads(tmp_path):
    """Format version 1 as before: np.load reads every member, and a file written by
    np.savez with the same members (what earlier fastopt wrote) loads."""
    opt = make("Adam", amsgrad=True)
    fill_grads(opt, 3)
    opt.step()
    path = tmp_path / "ck.npz"
    opt.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert int(z["format_version"]) == 1
        for i, p in enumerate(opt.layout.params):
            assert np.array_equal(z[f"param/{i}"], p)
        for i, entry in opt.state.items():
            for key, value in entry.items():
                if isinstance(value, np.ndarray):
                    assert np.array_equal(z[f"state/{i}/{key}"], value)
    path.write_bytes(_rewrite(path.read_bytes(), lambda m: None))
    other = make("Adam", amsgrad=True, seed=7)
    other.load(path)
    assert np.array_equal(other.flat_params, opt.flat_params)
    for k in opt.state:
        for key, value in opt.state[k].items():
            got = other.state[k][key]
            assert np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value


# ---- temporaries of killed saves -----------------------------------------------------------

# Saves a checkpoint whole, then starts a second save of the same target and, with the params
# written and the state not, says "mid-save" and waits for a line on stdin before going on.
SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    import fastopt
    path = sys.argv[1]
    opt = fastopt.AdamW([np.full(s, 0.5, np.float32) for s in [(1000, 1000), (3 * 10 ** 6,)]])
    opt.flat_grads.fill(1.0)
    opt.step()
    opt.save(path)
    write, calls = np.lib.format.write_array, []

    def pausing(*args, **kw):
        calls.append(1)
        if len(calls) == 5:     # format_version, meta, two params, then: the state
            print("mid-save", flush=True)
            sys.stdin.readline()
        return write(*args, **kw)
    np.lib.format.write_array = pausing
    opt.step()
    opt.save(path)
    print("saved", flush=True)
""")


def _saver(tmp_path, path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.stdout.readline() == "mid-save\n"
    return proc


def _temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_the_next_save_removes_temporaries_of_killed_saves(tmp_path):
    path = tmp_path / "ck.npz"
    left = []
    for _ in range(2):      # the second run's first save removes what the first run left
        proc = _saver(tmp_path, path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        left.append(_temporaries(tmp_path))
    assert [len(t) for t in left] == [1, 1] and left[0] != left[1], left
    assert os.path.getsize(tmp_path / left[1][0]) > 4 << 20     # killed after the params
    # what the killed saves left: the whole first checkpoint, and its readers ignore the rest
    opt = fastopt.AdamW([np.zeros(s, np.float32) for s in [(1000, 1000), (3 * 10 ** 6,)]])
    opt.load(path)
    assert opt.step_counts == [1]
    # a temporary of another target, whatever its writer, is not this save's business
    other = f".other.npz.fastopt-{proc.pid}-abc123.tmp"
    (tmp_path / other).write_bytes(b"not mine")
    opt.step()
    opt.save(path)
    assert _temporaries(tmp_path) == [other]
    again = fastopt.AdamW([np.zeros(s, np.float32) for s in [(1000, 1000), (3 * 10 ** 6,)]])
    again.load(path)
    assert again.step_counts == [2]
    assert np.array_equal(again.flat_params, opt.flat_params)


def test_a_save_leaves_a_live_writers_temporary_alone(tmp_path):
    path = tmp_path / "ck.npz"
    proc = _saver(tmp_path, path)
    try:
        live = _temporaries(tmp_path)
        assert len(live) == 1 and f"-{proc.pid}-" in live[0]
        opt = make()
        opt.step()
        opt.save(tmp_path / "ck.npz")
        assert _temporaries(tmp_path) == live
        out, _ = proc.communicate("go on\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "saved\n"
    assert sorted(os.listdir(tmp_path)) == ["ck.npz", "saver.py"]
    fresh = fastopt.AdamW([np.zeros(s, np.float32) for s in [(1000, 1000), (3 * 10 ** 6,)]])
    fresh.load(path)
    assert fresh.step_counts == [2]


# ---- memory --------------------------------------------------------------------------------

def test_save_and_load_hold_no_second_copy_of_the_state():
    """bench/checkpoint_memory.py in a fresh process: an AdamW of 1.25e7 params (48 MB a
    buffer) saves and loads its checkpoint with at most one buffer of resident memory above
    its trained steady state (params, grads, exp_avg, exp_avg_sq).  Measured: save 0.33 (a 16
    MiB chunk), load 0.0; before streaming, save 2.33 and load 3.0."""
    if UNDER_ASAN:
        pytest.skip("resident memory under AddressSanitizer is its allocator's, not fastopt's")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "checkpoint_memory.py"),
                           "--n", "1.25e7", "--json"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["save_extra_buffers"] <= 1.0, r
    assert r["load_extra_buffers"] <= 1.0, r
