"""The pyfunc request format (loading a registered version and generating is tested in test_registry.py)."""

import pandas as pd
import pytest

from alignprop.pyfunc import parse_request


def test_request_forms():
    assert parse_request({"prompt": ["a cat", "a dog"], "seed": 3}) == (["a cat", "a dog"], 3, {})
    assert parse_request({"prompt": "a cat"}) == (["a cat"], 0, {})
    assert parse_request(["a cat"], {"seed": 5, "guidance_scale": 2.0}) == (["a cat"], 5, {"guidance_scale": 2.0})
    frame = pd.DataFrame({"prompt": ["a cat", "a dog"], "seed": [7, 7], "num_inference_steps": [3.0, 3.0]})
    assert parse_request(frame) == (["a cat", "a dog"], 7, {"num_inference_steps": 3})  # the scoring server's form


@pytest.mark.parametrize("bad", [{"prompt": []}, {"seed": 1}, {"prompt": [1, 2]}])
def test_bad_requests_are_refused(bad):
    with pytest.raises(ValueError, match="'prompt' must be"):
        parse_request(bad)
