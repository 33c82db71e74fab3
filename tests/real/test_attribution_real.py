"""AtP and AtP* on smollm2-135m and IOI: agreement with exact patching."""

import pytest

from mechscope.patching import activation_patch, attribution_patch
from mechscope.patching.diagnostics import compare
from mechscope.tasks import ContrastiveBatch, ioi

pytestmark = pytest.mark.real


def test_atp_agrees_with_exact_and_atp_star_repairs_queries_and_keys(smollm2):
    model = smollm2
    batch = ContrastiveBatch.from_records(model, ioi(6, seed=0, model=model, templates=[0]))
    sites = ["head_z", "head_q", "head_k"]
    atp = attribution_patch(model, batch, sites=sites)
    star = attribution_patch(model, batch, sites=sites, method="atp*", graddrop=False)
    exact = {s: activation_patch(model, batch, site=s) for s in sites}
    assert compare(atp["head_z"], exact["head_z"]).pearson >= 0.9  # about 0.99 here
    for site in ("head_q", "head_k"):
        plain, fixed = compare(atp[site], exact[site]), compare(star[site], exact[site])
        assert fixed.pearson >= plain.pearson, (site, plain, fixed)
