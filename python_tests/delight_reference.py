"""An independent formulation of the authors' DeFINE (their DExTraEmb + DExTraUnit,
`--define-iclr`), written from their layout as docs/math.md describes it: plain torch over their
state-dict keys, a Python loop over groups, LayerNorm and GELU spelled out. Nothing from
define_kernels is used, so the tests compare two independent implementations. Their depth D
counts the expand layers and the reduce layer (our depth N = D - 1).
"""
import math

import torch

def their_layer_table(p, k, m, depth, max_groups):
    """(in, out, groups) per dextra layer, as their define_config computes them."""
    groups, counter = [], 0
    for _ in range(depth):
        g = 2 ** counter
        if g <= max_groups:
            counter += 1
        else:
            g, counter = 1, 1
        groups.append(g)
    groups = groups[::-1]
    step = (k - p) / (depth - 1)  # numpy.linspace(p, k, depth): i * step + start, endpoint k
    sizes = [int(i * step + p) for i in range(depth - 1)] + [int(k)]
    ins, outs = [p], []
    for i in range(depth - 1):
        multiple = max(groups[i + 1], groups[i], 8)
        outs.append(int(math.ceil(sizes[i + 1] / multiple)) * multiple)
        ins.append(outs[-1] + p)
    return list(zip(ins, outs + [m], groups))


def random_their_state_dict(vocab, n, m, k, depth, max_groups, norm=True, prefix="",
                            dtype=torch.float64, padding_idx=None):
    """Random tensors in their keys and layouts (biases and LN affines non-trivial)."""
    p = m // 2

    def layer(base, g, a, w):
        sd = {}
        if g == 1:
            sd[base + "weights"] = torch.randn(w, a, dtype=dtype) / math.sqrt(a)
            sd[base + "bias"] = torch.randn(w, dtype=dtype) * 0.3
        else:
            sd[base + "weights"] = torch.randn(g, a // g, w // g, dtype=dtype) / math.sqrt(a / g)
            sd[base + "bias"] = torch.randn(g, 1, w // g, dtype=dtype) * 0.3
        if norm:
            sd[base + "normalization_fn.weight"] = 1 + 0.3 * torch.randn(w // g, dtype=dtype)
            sd[base + "normalization_fn.bias"] = 0.3 * torch.randn(w // g, dtype=dtype)
        return sd

    sd = {"map_layer.weight": torch.randn(vocab, n, dtype=dtype) * n ** -0.5}
    if padding_idx is not None:
        sd["map_layer.weight"][padding_idx] = 0
    sd.update(layer("dextra_layer.input_layer.", 1, n, p))
    for index, (a, w, g) in enumerate(their_layer_table(p, k, m, depth, max_groups)):
        sd.update(layer(f"dextra_layer.dextra_layers.{index}.", g, a, w))
    sd.update(layer("dextra_layer.output_layer.", 1, p + m, m))
    return {prefix + key: value for key, value in sd.items()}


def _layer_norm(z, weight, bias):
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * weight + bias


def _act(z, act):
    if act == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2.0)))
    return torch.clamp_min(z, 0) if act == "relu" else z


def _their_layer(sd, base, u, act):
    weights, bias = sd[base + "weights"], sd[base + "bias"]
    if weights.dim() == 2:
        z = u @ weights.t() + bias
        shape = None
    else:
        g = weights.shape[0]
        chunks = u.reshape(*u.shape[:-1], g, -1)
        z = torch.stack([chunks[..., j, :] @ weights[j] + bias[j, 0] for j in range(g)], dim=-2)
        shape = z.shape[:-2] + (z.shape[-2] * z.shape[-1],)
    if base + "normalization_fn.weight" in sd:
        z = _layer_norm(z, sd[base + "normalization_fn.weight"], sd[base + "normalization_fn.bias"])
    z = _act(z, act)
    return z if shape is None else z.reshape(shape)


def their_embedding(sd, ids, act="gelu", scale_map=True, prefix=""):
    """Their DExTraEmb forward (eval mode) for ids of any shape."""
    sd = {key[len(prefix):]: value for key, value in sd.items() if key.startswith(prefix)}
    table = sd["map_layer.weight"]
    x = table[ids] * (math.sqrt(table.shape[1]) if scale_map else 1.0)
    x = _their_layer(sd, "dextra_layer.input_layer.", x, act)
    depth = sum(1 for key in sd if key.startswith("dextra_layer.dextra_layers.") and key.endswith(".weights"))
    out = x
    for i in range(depth):
        out = _their_layer(sd, f"dextra_layer.dextra_layers.{i}.", out, act)
        following = sd.get(f"dextra_layer.dextra_layers.{i + 1}.weights")
        g_next = following.shape[0] if following is not None and following.dim() == 3 else 1
        if g_next == 1:
            out = torch.cat([x, out], dim=-1)
        else:  # split and mix: per group j, chunk j of x then chunk j of out
            x_g = x.reshape(*x.shape[:-1], g_next, -1)
            out_g = out.reshape(*out.shape[:-1], g_next, -1)
            out = torch.cat([x_g, out_g], dim=-1).reshape(*out.shape[:-1], -1)
    return _their_layer(sd, "dextra_layer.output_layer.", out, act)


# (vocab, n, m, k, D, max_groups, norm, act): wrapping cycles (D > log2(g_max) + 1), widths not
