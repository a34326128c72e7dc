"""The reference model on its own: naive vs torch backend in float64, semantics, bad input, files."""
import pytest
import torch

import txl_fast
from txl_fast import TransfoXLConfig, TransfoXLLMHeadModel, TransfoXLModel, use_backend
from tests.helpers import CONFIGS, config_kwargs, our_model, rel_err


def make_model(name="default", dtype=torch.float64, seed=0, **over):
    return our_model(name, dtype, seed, **over)


def run_segments(model, segments, labels: bool, mems=None):
    outs = []
    for ids in segments:
        out = model(ids, mems=mems, labels=ids if labels else None, output_hidden_states=True)
        mems = out.mems
        outs.append(out)
    return outs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_naive_equals_torch_float64(name):
    model = make_model(name)
    g = torch.Generator().manual_seed(1)
    segments = [torch.randint(0, 97, (2, L), generator=g) for L in (5, 7, 4)]
    for labels in (True, False):
        with use_backend("naive"):
            ref = run_segments(model, segments, labels)
        with use_backend("torch"):
            out = run_segments(model, segments, labels)
        for r, o in zip(ref, out):
            for a, b in zip(r.hidden_states, o.hidden_states):
                assert rel_err(b, a) <= 1e-10
            if r.mems is not None:
                for a, b in zip(r.mems, o.mems):
                    assert rel_err(b, a) <= 1e-10
            if labels:
                assert rel_err(o.losses, r.losses) <= 1e-10
            else:
                assert rel_err(o.prediction_scores, r.prediction_scores) <= 1e-10


@pytest.mark.parametrize("name", ["default", "untie_r_false", "div_val_1_d_embed", "no_cutoffs", "pre_lnorm"])
def test_naive_equals_torch_gradients_float64(name):
    g = torch.Generator().manual_seed(2)
    segments = [torch.randint(0, 97, (2, L), generator=g) for L in (5, 6)]
    grads = {}
    for backend in ("naive", "torch"):
        model = make_model(name).train()
        with use_backend(backend):
            outs = run_segments(model, segments, labels=True)
            sum(o.loss for o in outs).backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert grads["naive"].keys() == grads["torch"].keys()
    for n, ref in grads["naive"].items():
        assert ref is not None and ref.abs().sum() > 0, f"{n} got no gradient"
        assert rel_err(grads["torch"][n], ref) <= 1e-10, n


def test_mems_none_is_zero_memory_and_empty_mems_is_paper_behaviour():
    model = make_model(same_length=False, clamp_len=0)
    ids = torch.randint(0, 97, (2, 5))
    implicit = model(ids)
    explicit = model(ids, mems=model.init_mems(2))
    assert torch.equal(implicit.prediction_scores, explicit.prediction_scores)
    assert implicit.mems[0].shape == (6, 2, 32)
    # empty memories: the first segment attends only to itself, like a model without memory
    empty = model(ids, mems=model.empty_mems(2))
    no_memory = TransfoXLLMHeadModel(TransfoXLConfig(**config_kwargs("default", same_length=False, clamp_len=0, mem_len=0)))
    no_memory.load_state_dict(model.state_dict())
    no_memory.to(torch.float64).eval()
    assert torch.allclose(empty.prediction_scores, no_memory(ids).prediction_scores, atol=1e-12)
    assert empty.mems[0].shape == (5, 2, 32)          # grows up to mem_len
    assert not torch.allclose(empty.prediction_scores, implicit.prediction_scores)


def test_memory_holds_last_mem_len_layer_inputs():
    model = make_model()
    seg1, seg2 = torch.randint(0, 97, (2, 4)), torch.randint(0, 97, (2, 9))   # seg2 longer than mem_len 6
    out1 = model(seg1, mems=model.empty_mems(2), output_hidden_states=True)
    assert [m.shape[0] for m in out1.mems] == [4, 4]
    out2 = model(seg2, mems=out1.mems, output_hidden_states=True)
    for layer, mem in enumerate(out2.mems):
        assert mem.shape == (6, 2, 32) and not mem.requires_grad
        assert torch.equal(mem, out2.hidden_states[layer].transpose(0, 1)[-6:])


def test_mem_len_zero_returns_no_mems():
    out = make_model("mem_len_0")(torch.randint(0, 97, (1, 5)))
    assert out.mems is None


def test_head_mask_output_shapes_and_tuples():
    model = make_model()
    ids = torch.randint(0, 97, (2, 5))
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert out.prediction_scores.shape == (2, 5, 97) and out.logits is out.prediction_scores
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 5, 11)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 5, 32)
    head_mask = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    masked = model(ids, head_mask=head_mask, output_attentions=True)
    assert torch.all(masked.attentions[0][:, 1] == 0)
    assert torch.allclose(masked.attentions[0][:, 3], out.attentions[0][:, 3] * 0.5)   # layer 0 sees equal inputs
    assert torch.equal(masked.attentions[0][:, 0], out.attentions[0][:, 0])
    tup = model(ids, labels=ids, return_dict=False)
    losses, scores, mems, loss = tup
    assert losses.shape == (2, 4) and scores == () and len(mems) == 2 and loss.dim() == 0
    assert model(ids, return_dict=False)[0].shape == (2, 5, 97)


def test_losses_in_position_order_and_loss_is_their_mean():
    model = make_model()
    ids = torch.randint(0, 97, (2, 6))
    labels = ids.clone()
    labels[1, 3] = -100
    out = model(ids, labels=labels)
    logprob = model(ids).prediction_scores[:, :-1]           # position t predicts label t + 1
    target = labels[:, 1:]
    expected = -logprob.gather(2, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)
    assert torch.allclose(out.losses, expected, atol=1e-12)
    assert torch.allclose(out.loss, expected.sum() / (target != -100).sum())


def test_inputs_embeds_equals_input_ids():
    model = make_model()
    ids = torch.randint(0, 97, (2, 5))
    embeds = model.transformer.word_emb(ids)
    a, b = model(ids), model(inputs_embeds=embeds)
    assert torch.allclose(a.prediction_scores, b.prediction_scores, atol=1e-12)


def test_save_load_is_bit_identical(tmp_path):
    model = make_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = TransfoXLLMHeadModel.from_pretrained(tmp_path)
    assert loaded.crit.out_layers[1].weight is loaded.transformer.word_emb.emb_layers[1].weight
    assert loaded.crit.out_projs[1] is loaded.transformer.word_emb.emb_projs[1]
    ids = torch.randint(0, 97, (2, 5))
    assert torch.equal(model(ids, labels=ids).losses, loaded(ids, labels=ids).losses)
    assert torch.equal(model(ids).prediction_scores, loaded(ids).prediction_scores)
    # a base model loads from the head model's file (HF's "transformer." prefix is stripped)
    base = TransfoXLModel.from_pretrained(tmp_path)
    assert torch.equal(base(ids).last_hidden_state, model.transformer(ids).last_hidden_state)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model32():
    return make_model(dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.tensor([[1, 97]])), r"token ids must be in \[0, 97\)"),
        (dict(input_ids=torch.tensor([[1, -1]])), r"token ids must be in"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), r"int64"),
        (dict(input_ids=torch.tensor([1, 2])), r"\(B, L\)"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"non-empty"),
        (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), r"empty batch"),
        (dict(inputs_embeds=torch.zeros(0, 2, 32)), r"empty batch"),
        (dict(), r"exactly one of input_ids and inputs_embeds"),
        (dict(input_ids=torch.tensor([[1]]), inputs_embeds=torch.zeros(1, 1, 32)), r"exactly one"),
        (dict(inputs_embeds=torch.zeros(1, 2, 31)), r"inputs_embeds must be"),
        (dict(inputs_embeds=torch.zeros(1, 2, 32, dtype=torch.float64)), r"inputs_embeds is torch.float64"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 200]])), r"labels must be in"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), r"labels must be \(B, L\)"),
        (dict(input_ids=torch.tensor([[1, 2]]), head_mask=torch.ones(3)), r"head_mask must be"),
    ],
)
def test_bad_inputs_raise(model32, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model32(**kwargs)


@pytest.mark.parametrize(
    "mems,match",
    [
        (lambda m: m.init_mems(1)[:1], r"list of 2 tensors"),
        (lambda m: [x[:, :, :5] for x in m.init_mems(1)], r"mems\[0\] must be"),
        (lambda m: [m.init_mems(1)[0], m.init_mems(1)[1][:3]], r"one mem_len for all layers"),
        (lambda m: m.init_mems(2), r"bsz=1"),
        (lambda m: [x.double() for x in m.init_mems(1)], r"float64"),
        (lambda m: torch.zeros(6, 1, 32), r"list of 2 tensors"),
    ],
)
def test_bad_mems_raise(model32, mems, match):
    with pytest.raises(ValueError, match=match):
        model32(torch.tensor([[1, 2]]), mems=mems(model32))


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(cutoffs=[50, 20]), "strictly increasing"),
        (dict(cutoffs=[20, 97]), "strictly increasing"),
        (dict(n_head=0), "n_head must be a positive"),
        (dict(mem_len=-1), "mem_len must be"),
        (dict(d_embed=4, div_val=4), "empty embedding"),
        (dict(attn_type=1), "attn_type"),
        (dict(dropout=1.5), "dropout"),
        (dict(d_model=33, d_embed=33, n_head=2, d_head=16), "d_model must be even"),
        # values of the wrong type, which would be misread rather than fail (a config.json written by hand)
        (dict(pre_lnorm="false"), "pre_lnorm must be true or false"),
        (dict(same_length=1), "same_length must be true or false"),
        (dict(tie_projs=[False, "abc", True]), "tie_projs must be a list of true/false"),
        (dict(mem_len=True), "mem_len must be an integer"),
        (dict(n_layer=True), "n_layer must be a positive integer"),
        (dict(clamp_len=2.5), "clamp_len must be an integer"),
        (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon must be a finite number > 0"),
        (dict(layer_norm_epsilon="x"), "layer_norm_epsilon must be a finite number > 0"),
        (dict(init_std=-1.0), "init_std must be a finite number >= 0"),
        (dict(attn_type="0"), "attn_type must be an integer"),
        (dict(eos_token_id="x"), "eos_token_id must be an integer or null"),
    ],
)
def test_impossible_configs_raise(over, match):
    with pytest.raises(ValueError, match=match):
        TransfoXLConfig(**config_kwargs("default", **over))


def test_heads_need_not_cover_d_model_as_in_hf():
    """HF projects d_model -> 3 * n_head * d_head, so n_head * d_head != d_model is a valid model."""
    model = make_model(d_model=34, d_embed=34, n_head=2, d_head=16)
    assert model(torch.tensor([[1, 2, 3]])).prediction_scores.shape == (1, 3, 97)


def test_config_json_must_state_the_sizes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks required fields: vocab_size, cutoffs, d_model"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)         # before building HF's 285M default model


def test_non_finite_weights_are_refused(tmp_path, model32):
    model32.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.layers.0.pos_ff.CoreNet.0.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or inf values in: transformer\.layers\.0\.pos_ff\.CoreNet\.0\.weight"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn])
def test_weights_in_a_dtype_a_float_weight_cannot_take_are_refused(tmp_path, model32, dtype):
    """Cast and loaded, an integer or bool weight would be a wrong model without a word."""
    model32.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    key = "transformer.layers.0.dec_attn.qkv_net.weight"
    state[key] = state[key].to(dtype)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"dtypes they cannot take .*{key}"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)


def test_from_pretrained_and_save_pretrained_refuse_bad_places(tmp_path, model32):
    model32.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown device 'cpux'"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path / "m", device="cpux")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TransfoXLLMHeadModel.from_pretrained(tmp_path / "m", device="cuda")
    with pytest.raises(ValueError, match="directory is empty"):
        TransfoXLLMHeadModel.from_pretrained("")
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        model32.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"


def test_config_json_nested_too_deep_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nests too deep"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)


def test_missing_and_corrupt_checkpoints(tmp_path, model32):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    model32.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a tensors-only PyTorch checkpoint"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    torch.save(model32.state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)


def test_pickled_bin_with_code_is_refused(tmp_path, model32):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    model32.config.to_json_file(tmp_path / "config.json")
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused"):
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


class _SystemCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
@pytest.mark.parametrize("protocol", range(6))
def test_code_in_a_bin_is_named_and_the_unsafe_advice_dropped(tmp_path, model32, protocol, zip_format):
    import pickle

    model32.config.to_json_file(tmp_path / "config.json")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _SystemCall(tmp_path / "pwned")}, path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):    # torch's own text carries the advice
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError) as e:
        TransfoXLLMHeadModel.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "holds code or objects that are not tensors" in msg and ("posix.system" in msg or "nt.system" in msg)
    assert "weights_only" not in msg and "\n" not in msg
    assert not (tmp_path / "pwned").exists()


def test_state_dict_mismatches_are_named(tmp_path, model32):
    from txl_fast.checkpoint import load_state_dict_into

    state = dict(model32.state_dict())
    state.pop("transformer.layers.0.dec_attn.r_net.weight")
    state["transformer.extra.weight"] = torch.zeros(1)
    state["crit.cluster_bias"] = torch.zeros(5)
    fresh = make_model(dtype=torch.float32, seed=1)
    with pytest.raises(ValueError) as e:
        load_state_dict_into(fresh, state)
    msg = str(e.value)
    assert "missing keys: transformer.layers.0.dec_attn.r_net.weight" in msg
    assert "unexpected keys: transformer.extra.weight" in msg
    assert "crit.cluster_bias: checkpoint (5,) vs model (2,)" in msg


def test_backend_selection():
    assert txl_fast.get_backend() == "auto"
    with use_backend("naive"):
        assert txl_fast.get_backend() == "naive"
    with pytest.raises(ValueError, match="unknown backend"):
        txl_fast.set_backend("cuda")
