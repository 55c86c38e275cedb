import pytest
import torch
from attack_helpers import tiny, tiny_edit

from erasure.attacks.base import AttackError
from erasure.attacks.models import peer_edit


def test_a_peer_checkpoint_becomes_the_edit_that_made_it():
    pipe, peer = tiny(), tiny()
    edit = tiny_edit(pipe, scale=0.5)
    edit.apply_to(peer)
    with torch.no_grad():
        peer.text_encoder.get_input_embeddings().weight[3] += 1.0
    found = peer_edit(pipe, peer, "peer")
    unet_keys = {k for k in found.deltas if k.startswith("unet.")}
    assert unet_keys == set(edit.deltas)
    for key in edit.deltas:
        torch.testing.assert_close(found.deltas[key], edit.deltas[key], rtol=0, atol=1e-6)
    assert [k for k in found.deltas if k.startswith("text_encoder.")] and found.config["method"] == "stack"
    found.check_base(pipe)


def test_a_peer_that_an_edit_cannot_carry_is_refused():
    from erasure.testing import tiny_pipeline

    pipe = tiny()
    with pytest.raises(AttackError, match="nothing to probe"):
        peer_edit(pipe, tiny(), "same")
    with pytest.raises(AttackError, match="another VAE"):
        peer_edit(pipe, tiny_pipeline("sd1", seed=1), "other")
