"""The path cost model: FLOP formulas, monotonicity, crossovers, the reference H200 timings."""
import pytest
import sympy

from slcompile import cost_model as cm

SHAPE = dict(in_features=6, out_features=4, rank=2, nnz=5)


def test_flops_match_hand_count():
    values = {cm.N: 10, cm.IN: 6, cm.OUT: 4, cm.R: 2, cm.NNZ: 5}
    # dense 6*N*in*out = 1440; materialize adds W twice (2*(2*r*in*out + nnz)) and dA, dB (2 * 2*r*in*out)
    assert cm.flops("dense").subs(values) == 1440
    assert cm.flops("materialize").subs(values) == 1440 + 2 * (96 + 5) + 2 * 96
    # factored: x A^T three times (fwd, dx, recompute) + dA: 8*N*r*in; B side 6*N*r*out; sparse 3 * 2*N*nnz
    assert cm.flops("factored").subs(values) == 960 + 480 + 300
    assert cm.flops("factored", recompute_xa=False).subs(values) == 720 + 480 + 300
    assert cm.flops("materialize", "forward").subs(values) == 480 + 96 + 5
    assert cm.flops("factored", "forward").subs(values) == 400 + 100
    assert cm.N in cm.flops("factored").free_symbols  # symbolic in the token count


def test_flop_ratios_are_design_floors():
    density, n, r, i, o = sympy.symbols("density N r in out", positive=True)
    materialize = cm.flop_ratio("materialize")
    assert sympy.simplify(materialize - (1 + 4 * r / (3 * n) + density / (3 * n))) == 0  # the scatter adds
    assert sympy.simplify(cm.flop_ratio("factored", recompute_xa=False) - (r * (i + o) / (i * o) + density)) == 0
    # the materialize floor 1 + 4r/(3N): 350M (r 256, q/k/v/o 1024x1024) at 2k tokens: 1.17
    assert float(materialize.subs({r: 256, n: 2048, density: 0})) == pytest.approx(1.1667, abs=1e-4)
    # factored needs fewer FLOPs than materialize at every N for the paper shapes: no positive FLOP crossover
    crossover = cm.flop_crossover().subs({cm.IN: 4096, cm.OUT: 11008, cm.R: 1024, cm.NNZ: int(0.05 * 4096 * 11008)})
    assert crossover < 0


@pytest.mark.parametrize("device", sorted(cm.DEVICES))
@pytest.mark.parametrize("mode", ["train", "forward"])
def test_time_increases_with_tokens(device, mode):
    for path in ("dense", *cm.PATHS):
        times = [cm.path_time(path, n, 4096, 11008, 1024, 2254438, device, mode) for n in (1, 16, 256, 4096, 65536)]
        assert times == sorted(times) and times[0] < times[-1]


def test_crossover_on_h200_with_library_sparse_kernels():
    shape = (4096, 11008, 1024, int(0.05 * 4096 * 11008))
    cross = cm.crossover_tokens(*shape, device="h200-cusparse")
    assert 1 < cross < 2048
    assert cm.choose_path(cross - 1, *shape, device="h200-cusparse") == "factored"
    assert all(cm.choose_path(n, *shape, device="h200-cusparse") == "materialize" for n in (cross, 2048, 16384))
    assert cm.crossover_tokens(*shape, device="h200-cusparse", margin=0.8) < cross  # a margin favours materialize


def test_matches_reference_section_6():
    """The reference implementation's H200 bf16 timings (ms): dense GEMM, form W, (xA^T)B^T, cuSPARSE S@x^T."""
    table = {((4096, 4096), 2048): (0.096, 0.073, 0.055, 0.95), ((4096, 4096), 16384): (0.81, 0.075, 0.38, 7.5),
             ((4096, 11008), 2048): (0.27, 0.19, 0.093, 2.5), ((4096, 11008), 16384): (2.17, 0.20, 0.77, 20.0)}
    for ((i, o), n), (gemm, form_w, low_rank, spmm) in table.items():
        nnz = int(0.05 * i * o)
        mat = cm.kernel_times("materialize", n, i, o, 1024, nnz, "h200", "forward")
        fac = cm.kernel_times("factored", n, i, o, 1024, nnz, "h200-cusparse", "forward")
        assert mat["y = x W^T"] * 1e3 == pytest.approx(gemm, rel=0.15)
        assert (fac["xa = x A^T"] + fac["y = xa B^T"]) * 1e3 == pytest.approx(low_rank, rel=0.15)
        assert fac["y += S x"] * 1e3 == pytest.approx(spmm, rel=0.1)
        assert mat["form W"] * 1e3 == pytest.approx(form_w, rel=0.1)
        # "the factored low-rank product is cheaper than forming W only when tokens are few"
        assert ((fac["xa = x A^T"] + fac["y = xa B^T"]) < mat["form W"]) == (low_rank < form_w)


def test_gather_in_gemm_kernels():
    """With dvalues from the dW GEMM's epilogue: no gather pass, and the factored SDDMM becomes
    that GEMM (2 N in out FLOPs at dense rate, no (out, in) result)."""
    subs = {cm.N: 256, cm.IN: 64, cm.OUT: 96, cm.R: 8, cm.NNZ: 300, cm.BPE: 2, cm.IB: 4}

    def totals(path, fused):
        ks = cm.path_kernels(path, "train", True, fused)
        return [k.name for k in ks], sum(k.flops for k in ks).subs(subs), sum(k.bytes for k in ks).subs(subs)

    names, mat_flops, mat_bytes = totals("materialize", True)
    plain_names, plain_flops, plain_bytes = totals("materialize", False)
    assert "dvalues = dW[support]" in plain_names and "dvalues = dW[support]" not in names
    assert mat_flops == plain_flops and mat_bytes < plain_bytes  # no second pass over dW
    (fused_dv,) = [k for k in cm.path_kernels("factored", "train", True, True) if k.name.startswith("dvalues")]
    assert fused_dv.unit == "dense" and sympy.expand(fused_dv.flops - 2 * cm.N * cm.IN * cm.OUT) == 0
    assert cm.DEVICES["h200-triton"].gather_in_gemm and not cm.DEVICES["h200"].gather_in_gemm
    shape = (16384, 4096, 11008, 1024, int(0.05 * 4096 * 11008))
    times = cm.kernel_times("factored", *shape, "h200-triton")
    assert times["dvalues = (dY^T x)[support]"] == pytest.approx(2 * 16384 * 4096 * 11008 / 690e12 + 5e-6, rel=1e-9)


def test_layer_costs_and_errors():
    costs = cm.layer_costs([(64, 64), (64, 172)], rank=16, density=0.1, tokens=8, device="cpu")
    assert costs["vs_dense"]["dense"] == 1.0 and len(costs["picks"]) == 2
    seconds = costs["seconds"]
    assert seconds["chosen"] <= min(seconds["materialize"], seconds["factored"]) * (1 + 1e-12)  # best per linear
    with pytest.raises(ValueError, match="device"):
        cm.device_for("tpu")
    with pytest.raises(ValueError, match="path"):
        cm.path_kernels("sparse")
    with pytest.raises(ValueError, match="mode"):
        cm.path_kernels("factored", "backward")


def test_sparse_element_cost_charges_only_the_sparse_products():
    from dataclasses import replace

    base = cm.DEVICES["cpu"]
    costly = replace(base, spmm_elem_s=1e-9, sddmm_elem_s=2e-9)
    n, i, o = 10, 6, 4
    plain = cm.kernel_times("factored", n, i, o, 2, 5, base, "train", 4)
    extra = cm.kernel_times("factored", n, i, o, 2, 5, costly, "train", 4)
    added = {name: extra[name] - plain[name] for name in plain}
    assert added["y += S x"] == pytest.approx(1e-9 * n * (i + o))
    assert added["dx += dY S"] == pytest.approx(1e-9 * n * (i + o))
    assert added["dvalues = (dY^T x)[support]"] == pytest.approx(2e-9 * n * (i + o))
    assert all(added[name] == 0 for name in plain if "S" not in name and "support" not in name)
    assert cm.kernel_times("materialize", n, i, o, 2, 5, costly, "train", 4) == \
        cm.kernel_times("materialize", n, i, o, 2, 5, base, "train", 4)
