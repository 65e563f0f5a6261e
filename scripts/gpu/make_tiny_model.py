"""Build a tiny random-weight Llama + tokenizer for wire-format captures.

Usage: python3 make_tiny_model.py OUTDIR
Needs only torch, transformers (5.x) and tokenizers. Deterministic (fixed seed).
Tokenizer: BPE with a Metaspace pre-tokenizer trained on an ASCII corpus, so
every token decodes to ASCII (no partial UTF-8 in the random output).
head_dim is 64 (hidden 128, 2 heads) so FlashAttention-3 accepts it.

Environment knobs for a larger random model (the routing benchmark needs prefill to cost
something): TINY_HIDDEN, TINY_LAYERS, TINY_HEADS, TINY_KV_HEADS, TINY_INTERMEDIATE,
TINY_MAX_POS, TINY_INIT_RANGE, TINY_DEVICE (e.g. cuda: initializing a 1B model on the
CPU takes minutes). Unset, the model is the tiny one the wire captures used.
"""

import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama"
os.makedirs(out, exist_ok=True)


def knob(name: str, default: str) -> str:
    return os.environ.get("TINY_" + name, default)


HIDDEN = int(knob("HIDDEN", "128"))
HEADS = int(knob("HEADS", "2"))
MAX_POS = int(knob("MAX_POS", "2048"))

SPECIALS = ["<unk>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

zen = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "  # noqa: E501 (the corpus, unchanged, fixes the tokenizer)
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
    "Readability counts. Special cases aren't special enough to break the rules. Although practicality "  # noqa: E501 (the corpus, unchanged, fixes the tokenizer)
    "beats purity. Errors should never pass silently. Unless explicitly silenced. In the face of "
    "ambiguity, refuse the temptation to guess. There should be one and preferably only one obvious way "  # noqa: E501 (the corpus, unchanged, fixes the tokenizer)
    "to do it. Now is better than never. If the implementation is hard to explain, it's a bad idea. "  # noqa: E501 (the corpus, unchanged, fixes the tokenizer)
    "Namespaces are one honking great idea, let's do more of those! "
    "The quick brown fox jumps over the lazy dog. Hello world, hello there, how are you today? "
    "Sluice is a proxy in front of vLLM; it streams tokens, counts usage and forwards errors. "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # @ % & _ | ~ ` ^ $ \\ "  # noqa: E501 (the corpus, unchanged, fixes the tokenizer)
)
corpus = [zen, "user\nassistant\nsystem\n" + zen.replace(". ", ".\n")] * 50

tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.decoder = decoders.Metaspace()
trainer = trainers.BpeTrainer(
    vocab_size=512, special_tokens=SPECIALS, min_frequency=1, show_progress=False
)
tok.train_from_iterator(corpus, trainer=trainer)
vocab_n = tok.get_vocab_size()

fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token="<unk>",
    bos_token="<|bos|>",
    eos_token="<|im_end|>",
    pad_token="<|pad|>",
    additional_special_tokens=["<|eos|>", "<|im_start|>"],
)
fast.chat_template = CHAT_TEMPLATE
fast.model_max_length = MAX_POS
fast.save_pretrained(out)

# Make sure the chat template lives in tokenizer_config.json (transformers 5 may
# write chat_template.jinja instead); keep a single source.
tc_path = os.path.join(out, "tokenizer_config.json")
with open(tc_path) as f:
    tc = json.load(f)
tc["chat_template"] = CHAT_TEMPLATE
with open(tc_path, "w") as f:
    json.dump(tc, f, indent=2)
jinja = os.path.join(out, "chat_template.jinja")
if os.path.exists(jinja):
    os.remove(jinja)

ids = {t: tok.token_to_id(t) for t in SPECIALS}
torch.manual_seed(1234)
cfg = LlamaConfig(
    vocab_size=vocab_n,
    hidden_size=HIDDEN,
    intermediate_size=int(knob("INTERMEDIATE", "256")),
    num_hidden_layers=int(knob("LAYERS", "2")),
    num_attention_heads=HEADS,
    num_key_value_heads=int(knob("KV_HEADS", str(HEADS))),
    head_dim=HIDDEN // HEADS,
    max_position_embeddings=MAX_POS,
    bos_token_id=ids["<|bos|>"],
    eos_token_id=ids["<|im_end|>"],
    pad_token_id=ids["<|pad|>"],
    tie_word_embeddings=False,
    # larger init -> peakier (less uniform) logits; a deep model wants the usual 0.02
    initializer_range=float(knob("INIT_RANGE", "0.5")),
)
cfg.torch_dtype = torch.bfloat16
with torch.device(knob("DEVICE", "cpu")):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)

gen = GenerationConfig(
    do_sample=True,
    temperature=0.3,
    top_p=0.9,
    top_k=50,
    repetition_penalty=1.1,
    bos_token_id=ids["<|bos|>"],
    eos_token_id=[ids["<|im_end|>"], ids["<|eos|>"]],
    pad_token_id=ids["<|pad|>"],
)
gen.save_pretrained(out)
print("vocab", vocab_n, "ids", ids)
print(sorted(os.listdir(out)))
