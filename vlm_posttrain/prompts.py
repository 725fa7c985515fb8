"""Every prompt and chat-template call of the project, in one place.

SFT, generation, self-judging, critic judging and DPO all render their text through this module, so the
bytes the model is trained on are the bytes it is asked at inference (the study used another model
family's template for DPO; a test renders one example through every path and compares).

The policy template is LLaVA-1.5's (Vicuna v1) conversation form:
``[system ]USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...``.
The assistant text sits inside ``{% generation %}`` markers so TRL's ``assistant_only_loss`` supervises
every assistant turn and nothing else. The answer's leading space belongs to the answer, so the
generation prompt ends in ``ASSISTANT:`` exactly as in training.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
EOS = "</s>"

LLAVA_15_TEMPLATE = (
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
    """The exact text the policy sees, through the processor's chat template (ours, set at load)."""
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=LLAVA_15_TEMPLATE
    )


def generation_prompt(processor, conversations: list[dict], system_prompt: str = "") -> str:
    """The prompt text for answering the final question of a conversation (its last answer removed)."""
    messages = to_messages(conversations, system_prompt)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(processor, messages, add_generation_prompt=True)
