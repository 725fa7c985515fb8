"""Every prompt and chat-template call of the project, in one place.

SFT, generation, self-judging, critic judging and DPO all render their text through this module, so the
bytes the model is trained on are the bytes it is asked at inference (the study used another model
family's template for DPO; a test renders one example of each family through every path and compares).

The policy template is its family's (``vlm_posttrain.families``), set on the processor at load; LLaVA-1.5's
is the Vicuna v1 conversation form defined here:
``<s>[system ]USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...``.
Tokenization policy: the template writes every special token, BOS included where the family has one, and
every tokenizer call passes ``add_special_tokens=False`` (TRL's collators do), so a LLaVA-1.5 sequence
starts with exactly one BOS, as llava-hf's own ``processor(text=...)`` gives, and a Qwen one with none; a
template that is not ours (a critic's) gets its BOS from :func:`with_bos`.
The assistant text sits inside ``{% generation %}`` markers so TRL's ``assistant_only_loss`` supervises
every assistant turn, its end-of-turn token included, and nothing else. An answer's leading space (LLaVA-1.5)
belongs to the answer, so the generation prompt ends in ``ASSISTANT:`` exactly as in training.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
EOS = "</s>"

LLAVA_15_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ASSISTANT:' }}"
    "{%- generation -%}"
    "{{ ' ' }}{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '</s>' }}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def strip_image_token(text: str) -> str:
    """The question text without the dataset's ``<image>`` marker (the template places the image)."""
    return text.replace(IMAGE_TOKEN, "").strip()


def to_messages(conversations: list[dict], system_prompt: str = "") -> list[dict]:
    """OneVision ``from``/``value`` turns as chat messages, the image attached to the first user turn."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    first_user = True
    for turn in conversations:
        role = "user" if turn["from"] == "human" else "assistant"
        content = [{"type": "text", "text": strip_image_token(turn["value"])}]
        if role == "user" and first_user:
            content.insert(0, {"type": "image"})
            first_user = False
        messages.append({"role": role, "content": content})
    return messages


def split_prompt(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split a conversation before its last assistant turn: (prompt messages, [final assistant turn])."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant turn to split off a completion")
    return messages[:-1], messages[-1:]


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The exact text the policy sees, through its family's training template (set on the processor at load)."""
    from vlm_posttrain import families

    template = families.of_processor(processor).chat_template
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def generation_prompt(processor, conversations: list[dict], system_prompt: str = "") -> str:
    """The prompt text for answering the final question of a conversation (its last answer removed)."""
    messages = to_messages(conversations, system_prompt)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(processor, messages, add_generation_prompt=True)


def final_question(conversations: list[dict]) -> str:
    """The last question of a conversation, without the image marker (what a judge is shown)."""
    humans = [t for t in conversations if t["from"] == "human"]
    return strip_image_token(humans[-1]["value"]) if humans else ""


def final_answer(conversations: list[dict]) -> str:
    """The reference answer: the conversation's last assistant turn."""
    answers = [t for t in conversations if t["from"] != "human"]
    return str(answers[-1]["value"]).strip() if answers else ""


def with_final_answer(conversations: list[dict], answer: str) -> list[dict]:
    """The conversation with its final answer replaced (a best-of-K SFT row)."""
    turns = [{"from": t["from"], "value": t["value"]} for t in conversations]
    if turns and turns[-1]["from"] != "human":
        turns = turns[:-1]
    return [*turns, {"from": "gpt", "value": answer}]


# ---- Preference rows in TRL's conversational vision format ---------------------------------------------
# String contents: TRL's collators put one {"type": "image"} before the first user text, which renders
# through the family's template exactly as generation_prompt (a test compares the bytes and the tokens).


def preference_prompt(conversations: list[dict], system_prompt: str = "") -> list[dict]:
    """TRL's ``prompt`` column: every turn before the final answer, as role/content strings."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns = list(conversations)
    if turns and turns[-1]["from"] != "human":
        turns = turns[:-1]
    for turn in turns:
        role = "user" if turn["from"] == "human" else "assistant"
        messages.append({"role": role, "content": strip_image_token(turn["value"])})
    return messages


def preference_completion(answer: str) -> list[dict]:
    """TRL's ``chosen`` / ``rejected`` column: one assistant turn."""
    return [{"role": "assistant", "content": answer}]


def completion_text(processor, prompt_messages: list[dict], answer: str) -> str:
    """The text the template appends after the generation prompt for ``answer`` (LLaVA-1.5: " {answer}</s>")."""
    prompt = render(processor, prompt_messages, add_generation_prompt=True)
    full = render(processor, [*prompt_messages, {"role": "assistant", "content": answer}])
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without an answer")
    return full[len(prompt) :]


def completion_ids(tokenizer, prompt_text: str, completion: str) -> list[int]:
    """The tokens of ``completion`` as they follow ``prompt_text``: the two tokenized together, split at the
    prompt's tokens.

    Tokenized on its own, a completion can tokenize differently: under Llama-2's normalizer " After</s>"
    alone is ["▁", "▁After", "</s>"], after "ASSISTANT:" it is ["▁After", "</s>"], which is what SFT trains
    and generation emits (TRL 1.16's vision preference collator tokenizes completions on their own).
    """
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt_text + completion, add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError(
            f"the completion {completion[:40]!r} merges with the prompt's last token; the prompt must end "
            "where a token ends (the chat template's generation prompt does)"
        )
    return full[len(prompt) :]


# ---- Self-judging: the policy compares two of its own answers -------------------------------------------
# The verdict is read from the probabilities of the two label tokens after "ASSISTANT:", never parsed from
# free text. Labels are neutral letters; the judge shows each pair in both orders and swaps the labels with
# the order, so a preference for a position or for a letter cancels (the study kept "X" on one answer and
# "Y" on the other while swapping the order, and "Y" won 371 to 241 between two samples of one model).
SELF_JUDGE_LABELS = ("X", "Y")
SELF_JUDGE_PROMPT = (
    "Here are two answers to a question about this chart.\n"
    "Question: {question}\n"
    "Answer {label1}: {answer1}\n"
    "Answer {label2}: {answer2}\n"
    "Which answer is more accurate, {label1} or {label2}? Reply with the letter only."
)


def self_judge_messages(question: str, first: str, second: str, labels: tuple[str, str]) -> list[dict]:
    text = SELF_JUDGE_PROMPT.format(
        question=question, label1=labels[0], answer1=first, label2=labels[1], answer2=second
    )
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def self_judge_prompt(processor, question: str, first: str, second: str, labels: tuple[str, str]) -> str:
    """The policy's own template around the judging question; its answer is one label."""
    return render(processor, self_judge_messages(question, first, second, labels), add_generation_prompt=True)


# ---- Critic judging: LLaVA-Critic's own pairwise prompt, verbatim ----------------------------------------
# From the lmms-lab/llava-critic-7b model card; the critic's answer starts with its verdict ("The first
# response is better ...", "Overall, the second response is better", "Both responses are equally ...").
CRITIC_PAIRWISE_PROMPT = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of the answers provided by a Large Multimodal Model (LMM). Determine which answer is better and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\n"
    "The first response: [{first}]\n"
    "The second response: [{second}]\n"
    "ASSISTANT:\n"
)
CRITIC_LABELS = ("first", "second")
CRITIC_SYSTEM_PROMPT = "You are a helpful assistant."

# LLaVA-Critic's conversation form (LLaVA-NeXT's "qwen_1_5": ChatML with a default system turn), used only
# for a critic checkpoint whose processor ships no chat template of its own.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + CRITIC_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for p in message['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ '<image>\n' }}{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def with_bos(tokenizer, text: str) -> str:
    """``text`` starting with exactly one BOS where the tokenizer's convention adds one (Llama's), as the
    tokenizer itself would with ``add_special_tokens=True``; unchanged for tokenizers without (Qwen's)."""
    bos = tokenizer.bos_token
    if not bos or text.startswith(bos):
        return text
    # What the tokenizer does, not its add_bos_token flag (a saved tokenizer.json keeps the post-processor
    # that adds the BOS, but reloads with the flag off).
    adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return bos + text if adds_bos else text


def _critic_render(processor, messages: list[dict]) -> str:
    template = getattr(processor, "chat_template", None) or CHATML_TEMPLATE
    text = processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    return with_bos(processor.tokenizer, text)


def critic_messages(question: str, first: str, second: str) -> list[dict]:
    text = CRITIC_PAIRWISE_PROMPT.format(question=question, first=first, second=second)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def critic_prompt(processor, question: str, first: str, second: str) -> str:
    """The critic's pairwise prompt through the critic's own chat template."""
    return _critic_render(processor, critic_messages(question, first, second))


# ---- Critic scoring: LLaVA-Critic's own pointwise prompt, verbatim (its typo "answer answers" included) ----
CRITIC_POINTWISE_PROMPT = (
    "Given an image and a corresponding question, please serve as an unbiased and fair judge to evaluate the "
    "quality of answer answers provided by a Large Multimodal Model (LMM). Score the response out of 100 and "
    "explain your reasoning with specific details. Your task is provided as follows:\n"
    "Question: [{question}]\n"
    "The LMM response: [{answer}]\n"
    "ASSISTANT:\n"
)
# The `expected` scoring mode reads the critic's score-token probabilities right after this fixed opening of
# its answer, so it never has to parse free text.
CRITIC_SCORE_PREFIX = "Score:"


def critic_pointwise_prompt(processor, question: str, answer: str) -> str:
    """The critic's pointwise prompt through the critic's own chat template."""
    text = CRITIC_POINTWISE_PROMPT.format(question=question, answer=answer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return _critic_render(processor, messages)
