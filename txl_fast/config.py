"""TransfoXLConfig: every field of HF's TransfoXLConfig, same defaults, reads and writes HF's config.json."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from txl_fast.checks import is_int, is_real

# Keys HF writes into config.json that describe the file or HF's own runtime, not the model.
_HF_BOOKKEEPING = {"architectures", "model_type", "transformers_version", "torch_dtype", "_name_or_path"}
# HF's `attribute_map` aliases.
_ALIASES = {"n_token": "vocab_size", "hidden_size": "d_model", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
# The sizes a config.json must state (HF always writes them): without them the defaults would build
# the 285M-parameter wt103 model from a file that never asked for it.
REQUIRED_IN_FILE = ("vocab_size", "cutoffs", "d_model", "d_embed", "n_head", "d_head", "d_inner", "div_val", "n_layer")


_BOOLS = ("pre_lnorm", "same_length", "proj_share_all_but_first", "adaptive", "untie_r", "tie_word_embeddings",
          "output_attentions", "output_hidden_states", "use_return_dict")


@dataclass
class TransfoXLConfig:
    vocab_size: int = 267735
    cutoffs: list = field(default_factory=lambda: [20000, 40000, 200000])
    d_model: int = 1024
    d_embed: int = 1024
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    div_val: int = 4
    pre_lnorm: bool = False
    n_layer: int = 18
    mem_len: int = 1600
    clamp_len: int = 1000
    same_length: bool = True
    proj_share_all_but_first: bool = True
    attn_type: int = 0
    sample_softmax: int = -1
    adaptive: bool = True
    dropout: float = 0.1
    dropatt: float = 0.0
    untie_r: bool = True
    init: str = "normal"
    init_range: float = 0.01
    proj_init_std: float = 0.01
    init_std: float = 0.02
    layer_norm_epsilon: float = 1e-5
    eos_token_id: Optional[int] = 0
    # from HF's PretrainedConfig, used by these models
    tie_word_embeddings: bool = True
    tie_projs: Optional[list] = None          # derived from proj_share_all_but_first when None
    pad_token_id: Optional[int] = None
    num_labels: int = 2
    problem_type: Optional[str] = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    use_return_dict: bool = True
    # anything else found in a config.json, written back unchanged
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.cutoffs = list(self.cutoffs)
        if self.tie_projs is None:
            self.tie_projs = [False] + [self.proj_share_all_but_first] * len(self.cutoffs)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a configuration no model can be built from."""
        def positive(name):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"TransfoXLConfig.{name} must be a positive integer, got {value!r}")

        for name in _BOOLS:     # a string such as "false" would be truthy: read as its opposite
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TransfoXLConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.tie_projs, list) or not all(isinstance(t, bool) for t in self.tie_projs):
            raise ValueError(f"TransfoXLConfig.tie_projs must be a list of true/false, got {self.tie_projs!r}")
        if not (is_real(self.layer_norm_epsilon) and math.isfinite(self.layer_norm_epsilon)
                and self.layer_norm_epsilon > 0):
            raise ValueError(f"TransfoXLConfig.layer_norm_epsilon must be a finite number > 0, "
                             f"got {self.layer_norm_epsilon!r}")
        for name in ("init_range", "proj_init_std", "init_std", "dropout", "dropatt"):
            value = getattr(self, name)
            if not (is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"TransfoXLConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("attn_type", "sample_softmax"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"TransfoXLConfig.{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                raise ValueError(f"TransfoXLConfig.{name} must be an integer or null, got {getattr(self, name)!r}")

        for name in ("vocab_size", "d_model", "d_embed", "n_head", "d_head", "d_inner", "div_val", "n_layer"):
            positive(name)
        if self.d_model % 2:
            # n_head * d_head may differ from d_model (as in HF), but the sinusoidal position
            # embedding has d_model / 2 (sin, cos) pairs
            raise ValueError(f"TransfoXLConfig.d_model must be even (sin/cos position pairs), got {self.d_model}")
        if not is_int(self.mem_len) or self.mem_len < 0:
            raise ValueError(f"TransfoXLConfig.mem_len must be an integer >= 0, got {self.mem_len!r}")
        if not is_int(self.clamp_len):     # <= 0: no clamp (HF; the original code's default is -1)
            raise ValueError(f"TransfoXLConfig.clamp_len must be an integer (0 or less: no clamp), got {self.clamp_len!r}")
        bounds = [0] + self.cutoffs + [self.vocab_size]
        if any(not isinstance(c, int) for c in self.cutoffs) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"TransfoXLConfig.cutoffs must be strictly increasing integers in (0, vocab_size={self.vocab_size}), "
                f"got {self.cutoffs}"
            )
        if self.div_val > 1 and self.d_embed // self.div_val ** len(self.cutoffs) < 1:
            raise ValueError(
                f"TransfoXLConfig: d_embed={self.d_embed} // div_val={self.div_val}**{len(self.cutoffs)} leaves "
                "an empty embedding for the last cluster"
            )
        if self.attn_type != 0:
            raise ValueError(f"TransfoXLConfig.attn_type={self.attn_type}: only 0 (relative, the default) exists")
        if self.sample_softmax > 0:
            raise ValueError("TransfoXLConfig.sample_softmax > 0 is not implemented (as in HF)")
        if len(self.tie_projs) != len(self.cutoffs) + 1:
            raise ValueError(f"TransfoXLConfig.tie_projs needs {len(self.cutoffs) + 1} entries, got {self.tie_projs}")
        for name in ("dropout", "dropatt"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TransfoXLConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    # ---- config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransfoXLConfig":
        d = {_ALIASES.get(k, k): v for k, v in d.items()}
        if "return_dict" in d:
            d["use_return_dict"] = d.pop("return_dict")
        if "id2label" in d and "num_labels" not in d:
            d["num_labels"] = len(d["id2label"])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _HF_BOOKKEEPING}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d["return_dict"] = d.pop("use_return_dict")
        d.update(extra)
        d["model_type"] = "transfo-xl"
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "TransfoXLConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{path} is not a config: its JSON nests too deep") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        if data.get("model_type", "transfo-xl") != "transfo-xl":
            raise ValueError(f"{path} describes a {data['model_type']!r} model, not 'transfo-xl'")
        missing = [k for k in REQUIRED_IN_FILE if k not in {_ALIASES.get(key, key) for key in data}]
        if missing:
            raise ValueError(f"{path} lacks required fields: {', '.join(missing)}")
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
