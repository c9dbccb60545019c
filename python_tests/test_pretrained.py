"""define_kernels/pretrained.py: DeFINE.from_embedding keeps the vocabulary, the padding row and
the table's principal geometry."""
import pytest
import torch
from torch import nn

from define_kernels import DeFINE



def test_from_embedding_keeps_vocab_padding_and_the_tables_principal_geometry():
    torch.manual_seed(4)
    basis = torch.randn(3, 20)
    weight = torch.randn(50, 3) @ basis + 0.5  # rank 3 around an offset
    embedding = nn.Embedding(50, 20, padding_idx=2)
    with torch.no_grad():
        embedding.weight.copy_(weight)
    model = DeFINE.from_embedding(embedding, map_dim=4, expand_dim=32, depth=2, max_groups=2)
    assert (model.num_embeddings, model.embedding_dim, model.padding_idx) == (50, 20, 2)
    assert torch.equal(model.map_weight[2], torch.zeros(4))
    rows = model.map_weight.detach().double()
    centred = weight.double() - weight.double().mean(0)
    # Pairwise distances are preserved up to the common rescale (rank 3 fits in 4 dims).
    distances, expected = torch.cdist(rows, rows), torch.cdist(centred, centred)
    keep = torch.ones(50, dtype=torch.bool)
    keep[2] = False
    ratio = distances[keep][:, keep] / expected[keep][:, keep].clamp_min(1e-12)
    off_diagonal = ~torch.eye(49, dtype=torch.bool)
    assert ratio[off_diagonal].std() < 1e-6 * ratio[off_diagonal].mean()
    assert abs(rows.pow(2).mean().item() ** 0.5 - 4 ** -0.5) < 0.05
    with pytest.raises(ValueError, match="map_dim"):
        DeFINE.from_embedding(embedding, map_dim=32, expand_dim=64)
