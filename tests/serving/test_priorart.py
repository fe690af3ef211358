"""Prior-art KV baselines: the quantizers against explicit twins, their error bounds, the
simulated pool and KIVI's group hook on a CPU pool, flags, refusals and config labels."""

import math
import types

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_tq.bench import configs, hf_reference
from sglang_tq.config import TQConfig
from sglang_tq.format import priorart
from sglang_tq.format.rotation import hadamard
from sglang_tq.serving import integration, refusals
from sglang_tq.serving.simulated import SimulatedKVPool
from tests.serving.conftest import (
    fake_model_config,
    make_server_args,
    one_sentence,
    parse_server_args,
    real_configurator,
    stock_fields,
)

pytestmark = pytest.mark.usefixtures(
    "plugin"
)  # registered once for the module, as in test_plugin.py

FP16_EPS = 2.0**-11  # relative rounding of a stored fp16 scale or zero point


def _bound(scale, zero, bits):
    """Per-coordinate error bound of RTN with a stored (scale, zero): half a step, plus the
    fp16 rounding of zero and of the top level zero + (2^b − 1)·scale (a value near the
    group's max can sit that far outside the representable range)."""
    s, z = scale.float(), zero.float()
    return s / 2 + FP16_EPS * (z.abs() + ((1 << bits) - 1) * s) + 1e-6


# ------------------------------------------------------------------ Hadamard + int
def _signs(d, seed):
    """The ±1 signs s of Π = H·diag(s)/√d, read off its first row (H's first row is all 1)."""
    return (priorart.hadamard_int(4, d, seed=seed).rotation()[0] * math.sqrt(d)).round().float()


@pytest.mark.parametrize("d", [64, 128])
def test_rotation_is_a_signed_sylvester_hadamard_and_orthogonal(d):
    pi = priorart.hadamard_int(4, d, seed=3).rotation()
    s = _signs(d, 3)
    assert set(s.tolist()) <= {-1.0, 1.0} and 0 < (s > 0).sum() < d
    want = hadamard(d) * s.double()[None, :] / math.sqrt(d)
    assert torch.allclose(pi, want, atol=1e-7)
    assert torch.allclose(pi @ pi.T, torch.eye(d, dtype=torch.float64), atol=1e-6)
    x = torch.randn(17, 3, d, generator=torch.Generator().manual_seed(d))
    q = priorart.hadamard_int(4, d, seed=3)
    assert torch.allclose(q.unrotate(q.rotate(x)), x, atol=1e-5)


def _rtn_twin(seg, bits):
    """One group, spelled out: fp16 zero = min, fp16 scale = range / (2^b − 1), RTN."""
    levels = (1 << bits) - 1
    zero = seg.min().half().float()
    scale = ((seg.max() - zero) / levels).half().float()
    if scale == 0:
        return torch.full_like(seg, zero.item())
    return ((seg - zero) / scale).round().clamp(0, levels) * scale + zero


def _hadamard_twin(x, bits, group, seed):
    """Explicit matrix rotation and a loop over every group of every vector."""
    d = x.shape[-1]
    s = _signs(d, seed)
    rot = torch.diag(s) @ hadamard(d).float() / math.sqrt(d)  # y = x @ rot
    y = x.float() @ rot
    out = torch.empty_like(y)
    flat_y, flat_o = y.reshape(-1, d), out.reshape(-1, d)
    for i in range(flat_y.shape[0]):
        for g0 in range(0, d, group):
            flat_o[i, g0 : g0 + group] = _rtn_twin(flat_y[i, g0 : g0 + group], bits)
    return out @ rot.T


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [None, 32])
def test_hadamard_int_matches_the_twin_within_half_a_step(d, bits, group):
    x = torch.randn(17, 2, d, generator=torch.Generator().manual_seed(bits * d)) * 3
    x[3, 1, 5] = 40.0  # an outlier: the rotation spreads it over the vector
    q = priorart.hadamard_int(bits, d, group=group, seed=7)
    got = q.round_trip(x)
    want = _hadamard_twin(x, bits, group or d, 7)
    # a rotated value within 1e-6 of a rounding tie may round the other way: one step at most
    codes, scale, zero = q.quantize(x)
    step = scale.float().amax()
    assert (got - want).abs().max() <= step * 1.01 + 1e-5
    assert torch.allclose(got, want, atol=1e-4) or (got - want).abs().gt(1e-4).float().mean() < 0.01
    # uniform rounding in the rotated space: every coordinate within half a step of its group
    y = q.rotate(x).reshape(*x.shape[:-1], -1, q.group_size)
    y_hat = priorart.dequantize_minmax(codes.reshape(y.shape), scale, zero)
    assert ((y - y_hat).abs() <= _bound(scale, zero, bits)).all()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    assert scale.dtype == zero.dtype == torch.float16
    # the rotation is orthogonal, so the error norm carries over to the original space
    assert torch.allclose((got - x).norm(), (y - y_hat).norm(), rtol=1e-4)


def test_hadamard_int_refuses_what_it_cannot_do():
    for kwargs, needle in (
        (dict(bits=4, head_dim=96), "power-of-two head_dim"),
        (dict(bits=5, head_dim=128), "bits in"),
        (dict(bits=4, head_dim=128, group=48), "must divide"),
    ):
        with pytest.raises(ValueError, match=needle) as exc:
            priorart.hadamard_int(**kwargs)
        assert one_sentence(str(exc.value))


def test_constant_vectors_read_back_exactly():
    x = torch.full((5, 64), 0.25)
    codes, scale, zero = priorart.quantize_minmax(x, 3, -1)
    assert (scale == 0).all()
    assert torch.equal(priorart.dequantize_minmax(codes, scale, zero), x)


def test_bytes_per_token_table():
    assert priorart.hadamard_int(4, 128).bytes_per_vector == 64 + 4
    assert priorart.hadamard_int(4, 128, group=32).bytes_per_vector == 64 + 16
    assert priorart.hadamard_int(2, 128).bytes_per_vector == 32 + 4
    q = priorart.kivi(4, 128)
    assert (q.key_bytes_per_token, q.value_bytes_per_token) == (80, 68)
    assert priorart.kivi(4, 128, value_group=32).value_bytes_per_token == 80
    assert (
        priorart.bytes_per_token_per_head("turboquant", 128, 4, 4)
        == TQConfig(128).bytes_per_token_per_head
    )
    assert [
        priorart.bytes_per_token_per_head(f, 128, 4, 4) for f in ("turboquant", "hadamard", "kivi")
    ] == [132, 136, 148]
    assert [
        priorart.bytes_per_token_per_head(f, 128, 2, 2) for f in ("turboquant", "hadamard", "kivi")
    ] == [68, 72, 84]


# --------------------------------------------------------------------------- KIVI
def _kivi_twin(k, v, bits_k, bits_v, g):
    """Loops: per complete group, per head, per channel for keys; per token for values."""
    t, h, d = k.shape
    k_out, v_out = k.clone(), v.clone()
    for j in range(t // g):
        for hh in range(h):
            for c in range(d):
                k_out[j * g : (j + 1) * g, hh, c] = _rtn_twin(
                    k[j * g : (j + 1) * g, hh, c].float(), bits_k
                )
        for i in range(j * g, (j + 1) * g):
            for hh in range(h):
                v_out[i, hh] = _rtn_twin(v[i, hh].float(), bits_v)
    return k_out, v_out


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kivi_matches_the_twin_and_keeps_the_window_exact(d, bits):
    g = 32
    t = 2 * g + 7  # two complete groups and an odd window
    gen = torch.Generator().manual_seed(d + bits)
    k = torch.randn(t, 2, d, generator=gen)
    k[:, 0, 3] += 25.0  # a key outlier channel, as KIVI observes
    v = torch.randn(t, 2, d, generator=gen)
    q = priorart.kivi(bits, d, v_bits=max(2, bits - 1))
    k_hat, v_hat = q.round_trip(k, v)
    k_twin, v_twin = _kivi_twin(k, v, q.k_bits, q.v_bits, g)
    assert torch.allclose(k_hat, k_twin, atol=1e-5) and torch.allclose(v_hat, v_twin, atol=1e-5)
    assert torch.equal(k_hat[2 * g :], k[2 * g :]) and torch.equal(v_hat[2 * g :], v[2 * g :])
    assert not torch.equal(k_hat[:g], k[:g])
    groups = k[: 2 * g].reshape(2, g, 2, d)
    codes, scale, zero = q.quantize_keys(groups)
    assert scale.shape == (2, 1, 2, d)  # one per channel per group
    err = (groups - k_hat[: 2 * g].reshape(groups.shape)).abs()
    assert (err <= _bound(scale, zero, q.k_bits)).all()
    _, v_scale, v_zero = q.quantize_values(v[: 2 * g])
    v_err = (v[: 2 * g] - v_hat[: 2 * g]).abs().reshape(2 * g, 2, 1, d)
    assert (v_err <= _bound(v_scale, v_zero, q.v_bits)).all()
    # the outlier channel's offset goes into its own zero point: its step stays that of
    # the other channels (a per-token key scale would grow with the 25)
    assert zero[0, 0, 0, 3] > 18 and scale[0, 0, 0, 3] < 2 * scale[0, 0, 0, :3].max()


def test_kivi_residual_and_short_sequences():
    q = priorart.kivi(4, 64, residual=64)
    assert [q.quantized_groups(t) for t in (0, 31, 63, 64, 95, 96, 127)] == [0, 0, 0, 1, 1, 2, 2]
    k = torch.randn(95, 1, 64)
    k_hat = q.round_trip_keys(k)
    assert torch.equal(k_hat[32:], k[32:]) and not torch.equal(k_hat[:32], k[:32])
    short = torch.randn(31, 2, 64)
    assert torch.equal(priorart.kivi(2, 64).round_trip_keys(short), short)
    with pytest.raises(ValueError, match="multiple of group_tokens"):
        priorart.kivi(4, 64, residual=40)


# ------------------------------------------------------------- the simulated pool
@pytest.fixture(autouse=True)
def _sglang_cpu_store(monkeypatch):
    """These pools live on the CPU, but SGLang picks its CUDA store kernel by platform, not
    by tensor device: on a CUDA host, route the bf16 pool's writes to its CPU path."""
    from sglang.srt.mem_cache import memory_pool

    monkeypatch.setattr(memory_pool, "_is_cuda", False)


def _pool(mode, bits=(4, 3), layers=2, heads=2, d=64, size=200, bf16_layers=(), key_centers=None):
    return SimulatedKVPool(
        size,
        1,
        torch.bfloat16,
        heads,
        d,
        layers,
        "cpu",
        False,
        mode=mode,
        k_bits=bits[0],
        v_bits=bits[1],
        seed=3,
        bf16_layers=bf16_layers,
        key_centers=key_centers,
    )


def test_hadamard_pool_stores_round_trips_and_keeps_the_stock_size():
    pool = _pool("hadamard", bf16_layers=(1,))
    stock = MHATokenToKVPool(200, 1, torch.bfloat16, 2, 64, 2, "cpu", False)
    assert pool.get_kv_size_bytes() == stock.get_kv_size_bytes()
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(9, 6, 64, generator=gen).bfloat16()
    k, v = qkv[:, 2:4], qkv[:, 4:]  # strided views, as RadixAttention passes
    loc = torch.randperm(199, generator=gen)[:9] + 1
    for layer_id in (0, 1):
        pool.set_kv_buffer(types.SimpleNamespace(layer_id=layer_id), loc, k, v)
    seed = TQConfig(head_dim=8, seed=3).layer_seed(0)
    want_k = priorart.hadamard_int(4, 64, seed=seed).round_trip(k)
    want_v = priorart.hadamard_int(3, 64, seed=seed).round_trip(v)
    assert torch.equal(pool.get_key_buffer(0)[loc], want_k)
    assert torch.equal(pool.get_value_buffer(0)[loc], want_v)
    assert torch.equal(pool.get_key_buffer(1)[loc], k) and torch.equal(
        pool.get_value_buffer(1)[loc], v
    )
    assert not torch.equal(want_k, k)


def test_hadamard_pool_with_key_centers_stores_q_of_k_minus_mu_plus_mu():
    """Keys with a large common part (Qwen's k_proj bias): Q(k - mu) + mu, in fp32 before the
    one bf16 rounding of the store; values untouched by the centers; KIVI refuses them."""
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(2, 2, 64, generator=gen) * 3
    mu[:, :, 5] = 300.0  # one huge bias coordinate per head
    k = (mu[0] + torch.randn(9, 2, 64, generator=gen)).bfloat16()
    v = torch.randn(9, 2, 64, generator=gen).bfloat16()
    loc = torch.arange(9) + 1
    plain, centered = _pool("hadamard"), _pool("hadamard", key_centers=mu)
    for pool in (plain, centered):
        pool.set_kv_buffer(types.SimpleNamespace(layer_id=0), loc, k, v)
    seed = TQConfig(head_dim=8, seed=3).layer_seed(0)
    fmt = priorart.hadamard_int(4, 64, seed=seed)
    want = (fmt.round_trip(k.float() - mu[0]) + mu[0]).bfloat16()
    assert torch.equal(centered.get_key_buffer(0)[loc], want)
    assert torch.equal(centered.get_value_buffer(0)[loc], plain.get_value_buffer(0)[loc])
    err = {
        n: (p.get_key_buffer(0)[loc].float() - k.float()).norm().item()
        for n, p in (("plain", plain), ("centered", centered))
    }
    assert err["centered"] < err["plain"] / 4, err  # the point of centering
    assert "keys centered" in centered.describe() and "keys centered" not in plain.describe()
    with pytest.raises(ValueError, match="hadamard only"):
        _pool("kivi", key_centers=mu)


def _decode(seq_lens, rows):
    return types.SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens),
        req_pool_indices=rows,
        extend_seq_lens_cpu=None,
    )


def _extend(seq_lens, new, rows):
    return types.SimpleNamespace(
        forward_mode=ForwardMode.EXTEND,
        batch_size=len(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens),
        req_pool_indices=rows,
        extend_seq_lens_cpu=list(new),
    )


def test_kivi_hook_requantizes_exactly_the_completed_groups():
    """Two requests written in chunks and decode steps through set_kv_buffer and the
    kivi-groups patch end with what KIVI gives for each whole sequence."""
    pool = _pool("kivi", bits=(2, 4), bf16_layers=(1,))
    gen = torch.Generator().manual_seed(1)
    lens = (75, 41)
    slots = torch.randperm(199, generator=gen)[: sum(lens)] + 1
    req_to_token = torch.zeros(4, 128, dtype=torch.int32)
    req_to_token[2, : lens[0]] = slots[: lens[0]].int()
    req_to_token[0, : lens[1]] = slots[lens[0] :].int()
    rows = torch.tensor([2, 0])
    runner = types.SimpleNamespace(
        token_to_kv_pool=pool, req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token)
    )
    kv = {
        r: (
            torch.randn(n, 2, 64, generator=gen).bfloat16(),
            torch.randn(n, 2, 64, generator=gen).bfloat16(),
        )
        for r, n in zip((2, 0), lens)
    }

    def write(row, start, end):
        loc = req_to_token[row, start:end].long()
        for layer_id in (0, 1):
            pool.set_kv_buffer(
                types.SimpleNamespace(layer_id=layer_id),
                loc,
                kv[row][0][start:end],
                kv[row][1][start:end],
            )

    done = [0, 0]
    for chunk in ((30, 17), (20, 20)):  # chunked prefill of both requests
        for i, (row, n) in enumerate(zip((2, 0), chunk)):
            write(row, done[i], done[i] + n)
        done = [a + b for a, b in zip(done, chunk)]
        integration._kivi_after_forward(None, runner, _extend(done, chunk, rows))
    assert pool.completed_groups([50, 37], [20, 20]) == [(0, 0), (1, 0)]
    while done[0] < lens[0]:  # then decode, request 1 finished
        live = [i for i in range(2) if done[i] < lens[i]]
        for i in live:
            write((2, 0)[i], done[i], done[i] + 1)
            done[i] += 1
        integration._kivi_after_forward(None, runner, _decode([done[i] for i in live], rows[live]))
    for row, n in zip((2, 0), lens):
        loc = req_to_token[row, :n].long()
        want_k, want_v = priorart.kivi(2, 64, v_bits=4).round_trip(*kv[row])
        assert torch.equal(pool.get_key_buffer(0)[loc], want_k)
        assert torch.equal(pool.get_value_buffer(0)[loc], want_v)
        assert torch.equal(pool.get_key_buffer(1)[loc], kv[row][0])  # a bf16 layer
        tail = n // 32 * 32
        assert torch.equal(pool.get_key_buffer(0)[loc[tail:]], kv[row][0][tail:])


def test_kivi_hook_is_a_no_op_for_other_pools():
    stock = MHATokenToKVPool(40, 1, torch.bfloat16, 1, 64, 1, "cpu", False)
    before = stock.get_key_buffer(0).clone()
    runner = types.SimpleNamespace(token_to_kv_pool=stock, req_to_token_pool=None)
    assert integration._kivi_after_forward("out", runner, _decode([32], torch.tensor([0]))) is None
    assert torch.equal(stock.get_key_buffer(0), before)
    idle = types.SimpleNamespace(forward_mode=ForwardMode.IDLE)
    runner.token_to_kv_pool = _pool("kivi")
    assert integration._kivi_after_forward(None, runner, idle) is None


def test_sglang_configurator_builds_the_simulated_pool_at_stock_size(parallel, monkeypatch):
    from sglang.srt.model_executor import forward_context
    from sglang.srt.model_executor.pool_configurator import create_memory_pool_configurator

    monkeypatch.setattr(integration, "_packed_pool_class", None)
    for mode, extra in (("hadamard", ()), ("kivi", ("--disable-radix-cache",))):
        kvc = real_configurator(
            make_server_args("--kv-quant", mode, "--kv-quant-bits", "k3v2", *extra)
        )
        assert create_memory_pool_configurator(kvc)._cell_size == 131_072  # as bf16
        pool = kvc._build_token_to_kv_pool(
            sizes=types.SimpleNamespace(max_total_num_tokens=64),
            is_dsa_model=False,
            is_dsv4_model=False,
            req_to_token_pool=None,
        )
        assert isinstance(pool, SimulatedKVPool) and isinstance(pool, MHATokenToKVPool)
        assert (pool.sim_mode, pool.k_bits, pool.v_bits, pool.dtype) == (mode, 3, 2, torch.bfloat16)
        assert sum(pool.get_kv_size_bytes()) == 131_072 * (64 + 1)
        # the fused rotary+set-KV write would bypass set_kv_buffer: off for this pool
        monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: pool)
        assert integration._enable_fused_set_kv_buffer(lambda fb: True, None) is False
    with pytest.raises(RuntimeError, match="could not install its simulated pool") as exc:
        integration._after_build_token_to_kv_pool(object(), kvc)
    assert one_sentence(str(exc.value))


# ----------------------------------------------------------------- flags, refusals
def test_simulated_modes_reach_server_args_and_log_that_they_are_simulated(fake_gpu, capfd):
    sa = parse_server_args(
        "--kv-quant", "hadamard", "--kv-quant-bits", "k3v3", "--kv-quant-seed", "4"
    )
    assert (sa.kv_quant, sa.kv_quant_bits, sa.kv_quant_seed, sa.kv_quant_key_centers) == (
        "hadamard",
        "k3v3",
        4,
        None,
    )
    assert sa.attention_backend != "turboquant"  # SGLang's own choice, as for bf16
    err = capfd.readouterr().err  # SGLang's log handler writes to the process's stderr
    line = [ln for ln in err.splitlines() if "SIMULATED" in ln]
    assert len(line) == 1 and "no memory saving" in line[0] and "hadamard k3v3" in line[0]
    assert parse_server_args("--kv-quant", "kivi", "--page-size", "32").kv_quant == "kivi"
    info = {}
    integration._resolved_config_dict(info, types.SimpleNamespace(server_args=sa))
    assert info["kv_quant"] == "hadamard" and info["kv_quant_bits"] == "k3v3"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--kv-quant", "hadamard", "--kv-quant-packed-prefill"], "--kv-quant-packed-prefill need"),
        (
            ["--kv-quant", "kivi", "--disable-radix-cache", "--kv-quant-key-centers", "none"],
            "--kv-quant-key-centers need",
        ),
        (
            ["--kv-quant", "hadamard", "--kv-cache-dtype", "fp8_e4m3"],
            "--kv-cache-dtype must be auto",
        ),
        (
            ["--kv-quant", "hadamard", "--attention-backend", "turboquant"],
            "fa3, flashinfer and triton",
        ),
        (["--kv-quant", "kivi"], "--disable-radix-cache or --page-size 32"),
        (["--kv-quant", "kivi", "--page-size", "32", "--enable-hierarchical-cache"], "HiCache"),
        (["--kv-quant", "hadamard", "--kv-quant-bf16-layers", "40"], "has layers 0..31"),
    ],
)
def test_simulated_mode_refusals(fake_gpu, argv, needle):
    with pytest.raises(ValueError, match=needle) as exc:
        parse_server_args(*argv)
    msg = str(exc.value)
    assert one_sentence(msg) and "--kv-quant" in msg, msg


def test_head_dim_refusals_per_mode(monkeypatch):
    from sglang.srt.configs import hybrid_arch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    odd = fake_model_config(head_dim=96, v_head_dim=96)
    with pytest.raises(ValueError, match="power-of-two head dims") as exc:
        refusals.check_model_config(odd, stock_fields(kv_quant="hadamard"))
    assert one_sentence(str(exc.value)) and "--kv-quant kivi" in str(exc.value)
    refusals.check_model_config(odd, stock_fields(kv_quant="kivi"))  # no rotation, any D
    with pytest.raises(ValueError, match=r"head dims in \(64, 128, 256\)"):
        refusals.check_model_config(odd, stock_fields(kv_quant="turboquant"))
    refusals.check_model_config(
        fake_model_config(), stock_fields(kv_quant="hadamard", attention_backend="fa3")
    )
    refusals.check_server_args(stock_fields(kv_quant="hadamard", attention_backend="fa3"))
    with pytest.raises(ValueError, match="--kv-quant turboquant decodes"):
        refusals.check_server_args(stock_fields(attention_backend="fa3"))


# ---------------------------------------------------------------- labels, scripts
def test_config_labels_map_to_the_simulated_flags(fake_gpu):
    assert configs.kv_server_flags("hq4") == ["--kv-quant", "hadamard", "--kv-quant-bits", "k4v4"]
    assert configs.kv_server_flags("hq2") == ["--kv-quant", "hadamard", "--kv-quant-bits", "k2v2"]
    assert configs.kv_server_flags("kivi2") == [
        "--kv-quant",
        "kivi",
        "--kv-quant-bits",
        "k2v2",
        "--disable-radix-cache",
    ]
    for label in ("hq3", "kivi4"):
        assert configs.expected_backend(label) is None  # SGLang's default, as bf16
        assert parse_server_args(*configs.kv_server_flags(label)).kv_quant in ("hadamard", "kivi")
    assert configs.parse_config_list("bf16,hq4,kivi4,k4v4") == ["bf16", "hq4", "kivi4", "k4v4"]
    assert configs.kv_server_flags("hq3-c") == [
        "--kv-quant",
        "hadamard",
        "--kv-quant-bits",
        "k3v3",
        "--kv-quant-key-centers",
        "bias",
    ]
    assert parse_server_args(*configs.kv_server_flags("hq4-c")).kv_quant_key_centers == "bias"
    for bad in ("hq5", "kivi", "hq4-nc", "kivi8", "kivi4-c"):
        with pytest.raises(ValueError, match="hqB-c"):
            configs.kv_server_flags(bad)


def test_fidelity_ref_round_trips_are_the_priorart_ones():
    assert hf_reference.parse_config("hq4") == (4, 4, "hadamard", False)
    assert hf_reference.parse_config("kivi2") == (2, 2, "kivi", False)
    assert hf_reference.parse_config("k4v4") == (4, 4, "mse", False)
    assert hf_reference.parse_configs("fp8,k4v4,hq4,kivi4") == [
        "bf16",
        "fp8",
        "k4v4",
        "hq4",
        "kivi4",
    ]
    x = torch.randn(1, 2, 70, 64)  # [B, H, T, D]
    k_fn, v_fn = hf_reference.round_trip_fns("hq3", 5, 64, seed=2)
    seed = TQConfig(head_dim=64, seed=2).layer_seed(5)
    assert torch.equal(k_fn(x), priorart.hadamard_int(3, 64, seed=seed).round_trip(x))
    k_fn, v_fn = hf_reference.round_trip_fns("kivi4", 0, 64)
    want = priorart.kivi(4, 64).round_trip_keys(x[0].transpose(0, 1)).transpose(0, 1)
    assert torch.equal(k_fn(x)[0], want)
    assert torch.equal(v_fn(x)[..., 64:, :], x[..., 64:, :])
    with pytest.raises(ValueError, match="sglang_tq.bench attn-error"):
        hf_reference.make_cache("kivi4", 2, 64)
    for bad in ("hq1", "kivi16", "hq4-c"):
        with pytest.raises(ValueError, match="hqB / kiviB"):
            hf_reference.parse_config(bad)
