"""txl_fast.safe_pickle: malicious pickles are refused before anything runs, benign ones load.

Every malicious payload would create a marker file if any of its code ran; each test checks
the marker is absent. Payloads are built two ways: `pickle.dumps` of an object whose
`__reduce__` names the callable (protocols 0, 2, 4, 5: GLOBAL and STACK_GLOBAL opcodes), and
opcode strings written by hand (GLOBAL, INST, persistent ids, names of other platforms).
"""
import builtins
import collections
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch

from txl_fast.safe_pickle import InertObject, UnsafePickleError, load_legacy_pickle

PROTOCOLS = [0, 2, 4, 5]


class Reduce:
    """Pickles as `func(*args)`."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path):
    """(name, object whose unpickling would create `marker`)."""
    return [
        ("os.system", Reduce(os.system, (f"touch {marker}",))),
        ("builtins.eval", Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').close()",))),
        ("builtins.exec", Reduce(builtins.exec, (f"open({str(marker)!r}, 'w').close()",))),
        ("subprocess.Popen", Reduce(subprocess.Popen, (["touch", str(marker)],))),
        ("builtins.getattr", Reduce(builtins.getattr, (Reduce(builtins.__import__, ("os",)), "system"))),
        ("builtins.__import__", Reduce(builtins.__import__, ("os",))),
        ("builtins.open", Reduce(builtins.open, (str(marker), "w"))),
    ]


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a refused pickle ran code"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_reduce_payloads_refused(marker, protocol, nested):
    for name, obj in payloads(marker):
        if nested:  # buried in a vocabulary-shaped dict, after benign entries
            obj = {"idx2sym": ["a", "b"], "counter": collections.Counter("ab"), "x": [1, {"y": obj}]}
        data = pickle.dumps(obj, protocol=protocol)
        with pytest.raises(UnsafePickleError) as exc:
            load_legacy_pickle(data)
        # os.system pickles as posix.system (nt.system on Windows)
        short = name.split(".")[-1]
        assert re.search(rf"refused global '[\w.]+\.{re.escape(short)}'", str(exc.value)), str(exc.value)
        assert isinstance(exc.value, ValueError)


HAND_BUILT = {
    # protocol 0 GLOBAL + REDUCE
    "os.system": b"cos\nsystem\n(S'touch MARKER'\ntR.",
    "posix.system": b"cposix\nsystem\n(S'touch MARKER'\ntR.",
    "nt.system": b"cnt\nsystem\n(S'touch MARKER'\ntR.",
    "subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\nS'MARKER'\nltR.",
    "builtins.eval": b"c__builtin__\neval\n(S'open(\"MARKER\", \"w\").close()'\ntR.",
    # INST: import and call in one opcode
    "os.system (INST)": b"(S'touch MARKER'\nios\nsystem\n.",
    # protocol 4 STACK_GLOBAL
    "builtins.exec (STACK_GLOBAL)": b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93\x8cCODE\x85R.",
    # an allowed type, then a refused global inside its arguments
    "nested in OrderedDict": b"ccollections\nOrderedDict\n((S'k'\ncos\nsystem\n(S'touch MARKER'\ntRtltR.",
}


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_hand_built_payloads_refused(marker, name):
    code = f"open('{marker}', 'w').close()".encode()
    data = HAND_BUILT[name].replace(b"CODE", bytes([len(code)]) + code)  # SHORT_BINUNICODE: length byte, text
    data = data.replace(b"MARKER", str(marker).encode())
    with pytest.raises(UnsafePickleError, match=r"refused global '(os|posix|nt|subprocess|builtins)\."):
        load_legacy_pickle(data)


def test_codecs_encode_only_latin1():
    with pytest.raises(UnsafePickleError, match="latin-1"):
        load_legacy_pickle(b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.")
    assert load_legacy_pickle(b"c_codecs\nencode\n(V\\u00ff\nS'latin1'\ntR.") == b"\xff"


def test_persistent_id_and_tensors_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_legacy_pickle(b"\x80\x02X\x01\x00\x00\x00aQ.")
    path = tmp_path / "t.bin"
    for zipped in (True, False):
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(UnsafePickleError, match="torch"):
            load_legacy_pickle(path)


def test_inert_globals_construct_nothing():
    # HF tokenizer pickles hold sacremoses objects: they come back as inert stand-ins
    data = b"csacremoses.tokenize\nMosesTokenizer\n(S'en'\ntR(dS'lang'\nS'en'\nsb."
    obj = load_legacy_pickle(data)
    assert isinstance(obj, InertObject)
    assert obj.qualname == "sacremoses.tokenize.MosesTokenizer"
    assert not hasattr(obj, "lang")


def benign():
    dd = collections.defaultdict(int, {"a": 1})
    return {
        "idx2sym": ["<eos>", "café", "naïve", "@-@"],
        "sym2idx": collections.OrderedDict([("<eos>", 0), ("café", 1)]),
        "counter": collections.Counter({"the": 3, "a": 1}),
        "dd": dd,
        "dq": collections.deque([1, 2]),
        "misc": (None, True, False, 1.5, -(2**70), 3 + 4j, b"\x00\xff", bytearray(b"ab"), {1, 2}, frozenset("x")),
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_benign_round_trip(protocol):
    obj = benign()
    out = load_legacy_pickle(pickle.dumps(obj, protocol=protocol))
    assert out == obj
    assert {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in obj.items()}
    assert [type(v) for v in out["misc"]] == [type(v) for v in obj["misc"]]
    assert out["dd"]["missing"] == 0


def test_paths_and_torch_save_formats(tmp_path):
    obj = benign()
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps(obj))
    assert load_legacy_pickle(path) == obj
    assert load_legacy_pickle(str(path)) == obj
    for zipped in (True, False):
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        assert load_legacy_pickle(path) == obj


def test_truncated_and_corrupt(tmp_path):
    data = pickle.dumps(benign(), protocol=4)
    for n in range(len(data)):
        with pytest.raises(ValueError, match="empty|truncated or corrupt"):
            load_legacy_pickle(data[:n])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_legacy_pickle(b"\x80\x04\xff\xfe garbage")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_legacy_pickle(b"not a pickle at all")
    path = tmp_path / "t.bin"
    torch.save(benign(), path)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_legacy_pickle(path.read_bytes()[:-40])


def test_package_never_unpickles_unrestricted():
    """No pickle.load(s) in the package, and torch.load only with weights_only=True."""
    root = Path(__file__).resolve().parents[1] / "txl_fast"
    for path in root.rglob("*.py"):
        src = path.read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\.loads?\(", src), path
        for m in re.finditer(r"\btorch\.load\(", src):
            depth, end = 1, m.end()
            while depth:  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(src[end], 0)
                end += 1
            call = src[m.end(): end]
            assert "weights_only=True" in call, f"{path}: torch.load without weights_only=True"
