"""The shipped default model (inference/shipped/shapes): a small version of `dallebot eval shapes`.

CI gate: at least 75% of 40 grammar prompts fully correct with the manifest's sampling defaults.
"""

from inference.bundle import Bundle
from inference.pipeline import Pipeline
from inference.shapes.evaluate import evaluate, pipeline_generator
from inference.shipped import SHAPES_BUNDLE


def test_shipped_bundle_is_complete_and_small():
    bundle = Bundle.open(SHAPES_BUNDLE, verify=True)
    assert bundle.name.startswith("shapes")
    assert not bundle.random_weights
    size = sum(p.stat().st_size for p in SHAPES_BUNDLE.iterdir() if p.is_file())
    assert size <= 30 * 1024 * 1024


def test_shipped_model_follows_prompts():
    pipe = Pipeline.load(SHAPES_BUNDLE, provider="cpu")
    report = evaluate(pipeline_generator(pipe), n=40, seed=0, batch=20)
    assert report.fully_correct >= 0.75, report.format()
