"""``python -m sglang_tq.bench ab-decode``'s variant syntax (the timing itself needs a GPU)."""

import pytest

import sglang_tq.bench.ab_decode as ab_decode


def test_variant_overrides_are_typed():
    assert ab_decode.parse_variant("table:") == ("table", {})
    name, kw = ab_decode.parse_variant(
        "r168:prefetch=0,num_stages=3,maxnreg=168,programs_per_sm=12"
    )
    assert name == "r168"
    assert kw == {"prefetch": False, "num_stages": 3, "maxnreg": 168, "programs_per_sm": 12}
    assert ab_decode.parse_variant("mma:impl=mma") == ("mma", {"impl": "mma"})


@pytest.mark.parametrize(
    "text, why",
    [
        ("r168", "NAME:key=value"),
        (":maxnreg=1", "NAME:key=value"),
        ("a:fused=1", "not key=value"),
        ("a:maxnreg=x", "integer"),
        ("a:impl=cuda", "impl must be one of triton, mma"),
    ],
)
def test_bad_variants_are_refused_in_one_sentence(text, why):
    with pytest.raises(SystemExit, match=why):
        ab_decode.parse_variant(text)
