"""Tiny GPT-2 and Llama models (no download) for the Hugging Face integration tests."""
import torch
import transformers

from define_kernels.integrations import transformers as hf

VOCAB, HIDDEN = 1000, 64
DEFINE = dict(map_dim=16, expand_dim=64, depth=2, max_groups=2)


def gpt2_config(**overrides):
    return transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0), **overrides})


def llama_config(**overrides):
    return transformers.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                              eos_token_id=2), **overrides})


CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}
LM_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}


def gpt2():
    # GPT-2's nn.Embedding has no padding index; pad_token_id serves its classifier heads' pooling.
    return transformers.GPT2LMHeadModel(gpt2_config())


def llama():
    return transformers.LlamaForCausalLM(llama_config())


FAMILIES = {"gpt2": gpt2, "llama": llama}


def converted(family, **options):
    """A DeFINE causal LM of `family` in eval mode, and the report."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    report = hf.use_define(model, **{**DEFINE, **options})
    return model.eval(), report  # eval: GPT-2's own dropout would make logits random


def batch(seed=1, vocab=VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 12), generator=generator)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def define_state(model):
    """The DeFINE module's tensors by name (relative to the module)."""
    return {k: v.detach().clone() for k, v in hf.define_embedding(model).state_dict().items() if k != "_extra_state"}
