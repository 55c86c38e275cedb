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


def test_a_peer_with_its_own_token_table_survives_an_added_token():
    """A retrained text encoder's edit holds the whole token table; an attack's added token must not break it."""
    from attack_helpers import CONCEPT, brightness_judge, red_selector

    import erasure.attacks as attacks
    from erasure.attacks.context import AttackContext
    from erasure.attacks.override import added_token, token_embedding
    from erasure.edit import fingerprint

    pipe, peer = tiny(), tiny()
    with torch.no_grad():
        token_embedding(peer.text_encoder).weight.mul_(1.5)
    edit = peer_edit(pipe, peer, "peer")
    assert any(key.endswith("token_embedding.weight") for key in edit.deltas)
    before = fingerprint(dict(pipe.text_encoder.named_parameters()))
    ctx = AttackContext(pipe, edit, brightness_judge, red_selector, steps=2)
    table = token_embedding(pipe.text_encoder).weight.detach().clone()
    with added_token(pipe, "<new>", table[5]) as token_id:
        with ctx.model("edited"):
            grown = token_embedding(pipe.text_encoder).weight
            torch.testing.assert_close(grown[:token_id], token_embedding(peer.text_encoder).weight, rtol=0, atol=1e-6)
            assert torch.equal(grown[token_id], table[5])  # the added row is not the edit's
        assert torch.equal(token_embedding(pipe.text_encoder).weight[:token_id], table)  # reverted bit for bit
    assert fingerprint(dict(pipe.text_encoder.named_parameters())) == before
    result = attacks.get_attack("inversion", steps=2, batch_size=2, images=2).run(ctx, CONCEPT)
    assert len(result.hits) and fingerprint(dict(pipe.text_encoder.named_parameters())) == before
