"""A word-piece tokenizer built locally, so the tiny world needs no download.

Words are split on whitespace and punctuation; a word outside the vocabulary falls back to its characters
(word-piece continuation pieces), so any ASCII text round-trips, case included, without an unknown token. Case is
kept so that option letters come out as benchmarks write them ("B", not "b"): VLMEvalKit matches them exactly.
Everything is a stock `tokenizers` component, so the tokenizer saves and loads like any other.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Bump when the tokenizer built from the same words changes: cached tiny checkpoints are keyed by it.
TOKENIZER_VERSION = 2

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN, "<unk>"]

# Qwen2.5-VL's placeholders: each image or video sits between vision start and end markers.
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
QWEN_SPECIAL_TOKENS = [
    PAD_TOKEN,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    QWEN_IMAGE_TOKEN,
    QWEN_VIDEO_TOKEN,
    "<unk>",
]

# Same shape as the Qwen2 template LLaVA-OneVision uses: content is a list of {"type": "text"|"image"|"video"}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image> ' }}"
    "{% elif item['type'] == 'video' %}{{ '<video> ' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' <|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)

QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("'<image> '", f"'{VISION_START}{QWEN_IMAGE_TOKEN}{VISION_END} '").replace(
    "'<video> '", f"'{VISION_START}{QWEN_VIDEO_TOKEN}{VISION_END} '"
)

BASE_WORDS = (
    "user assistant system yes no a an the is are of at in on to what which where how many color colour shape "
    "object objects image video frame first last left right top bottom middle center centre above below "
    "red green blue yellow purple orange white black gray grey brown pink cyan "
    "circle square triangle star cross diamond ring bar small large big tiny "
    "zero one two three four five six seven eight nine ten there answer with letter word option options "
    "count more fewer than same different appears moves time begin end start"
).split()


def build_word_tokenizer(words: list[str] | None = None, placeholders: str = "llava") -> PreTrainedTokenizerFast:
    """Build a fast tokenizer over `words` (+ characters), with the special tokens and chat template of
    LLaVA-OneVision (`placeholders="llava"`: <image>, <video>) or Qwen2.5-VL ("qwen": <|image_pad|> and
    <|video_pad|> between vision start and end markers)."""
    if placeholders not in ("llava", "qwen"):
        raise ValueError(f"placeholders={placeholders!r}: use llava or qwen")
    qwen = placeholders == "qwen"
    special = QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS
    vocab: dict[str, int] = {}
    characters = [*string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]
    for token in [*special, *characters, *("##" + c for c in characters)]:
        vocab.setdefault(token, len(vocab))
    for word in [*BASE_WORDS, *(words or [])]:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=64))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token="<unk>",
        additional_special_tokens=[t for t in special if t not in (PAD_TOKEN, IM_END, "<unk>")],
        chat_template=QWEN_CHAT_TEMPLATE if qwen else CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1 << 16,
    )
    return tokenizer
