"""Chat templates by name, for tokenizers that have none or carry the wrong one (data.chat_template).

Each is a Jinja template rendered by the tokenizer's own `apply_chat_template` (so `bos_token`,
`eos_token`, `tools`, `add_generation_prompt` and extra variables reach it as they would reach the
model's own template), written here after each family's layout:

    chatml    <|im_start|>{role}\\n{content}<|im_end|>\\n                  prompt <|im_start|>assistant\\n
    qwen2.5   chatml with Qwen's default system prompt; Hermes-style tools
    qwen3     chatml; answers after the last user turn carry <think>{reasoning}</think> (empty when there
              is none), earlier answers lose their reasoning, as Qwen3's own template does
    llama3    {bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>; tool results as ipython
    llama2    {bos}[INST] <<SYS>>..<</SYS>> {user} [/INST] {answer} {eos}, a bos before every [INST]
    mistral   {bos}[INST] {system\\n\\n}{user}[/INST] {answer}{eos}; [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]
    gemma     {bos}<start_of_turn>user\\n{system\\n\\n}{content}<end_of_turn>\\n, the answer's role is `model`
    phi-3     <|{role}|>\\n{content}<|end|>\\n                              prompt <|assistant|>\\n
    zephyr    <|{role}|>\\n{content}{eos}\\n                               prompt <|assistant|>\\n
    alpaca    {system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{answer}{eos}\\n\\n
    plain     {system}\\nUser: {user}\\nAssistant: {answer}{eos}\\n          prompt `Assistant:` (the space is the answer's)

Tools: chatml and the Qwen templates list the functions as JSON inside <tools></tools> in the system
turn, calls are `<tool_call>\\n{"name", "arguments"}\\n</tool_call>` and results come back as a user turn
wrapped in <tool_response>; llama3 lists them in the system turn and calls are `{"name", "parameters"}`
JSON; mistral uses its own markers. The others use one plain convention: the functions listed in the
system text, calls as `<tool_call>{json}</tool_call>` in the answer, results as a user-side turn.
Every template but qwen3 renders a conversation's prompt as a prefix of the whole conversation;
alpaca and plain start with bos_token when the tokenizer adds one itself (`add_bos_token`). Content is
written verbatim, never trimmed, and a non-empty reasoning_content becomes a <think> block.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DeltaError

# ---------------------------------------------------------------- shared pieces

_TOOL_LIST = ("{%- for t in tools or [] -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}")
_CALL_JSON = "({'name': c.function.name, 'arguments': c.function.arguments} | tojson)"
_THINK = "{%- if m.reasoning_content -%}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' -}}{%- endif -%}"
_GENERIC_TOOLS = ("'Functions you can call, as JSON schemas:' + TOOLS + '\\nTo call one, answer with "
                  "<tool_call>{\"name\": <function name>, \"arguments\": <JSON object>}</tool_call>.'")


def _system_text(default: str = "") -> str:
    """Sets `system` (the first system message, else the default) and `rest` (the other messages)."""
    return ("{%- if messages and messages[0].role == 'system' -%}{%- set system = messages[0].content -%}"
            "{%- set rest = messages[1:] -%}{%- else -%}"
            f"{{%- set system = {default!r} -%}}{{%- set rest = messages -%}}{{%- endif -%}}")


def _tools_string() -> str:
    return "{%- set TOOLS -%}" + _TOOL_LIST + "{%- endset -%}"


def _headed(heads: dict[str, str], end: str, generation: str, *, bos: str = "", default_system: str = "",
            tools: str = "generic", tool_head: str | None = None, qwen3: bool = False) -> str:
    """A template of turns `head[role] + content + end`, with tools, reasoning and system as the docstring says."""
    if tools == "hermes":
        system = ("{%- if tools -%}{{- '" + heads["system"] + "' + (system + '\\n\\n' if system else '') + "
                  "'# Tools\\n\\nYou can call the functions below, described as JSON inside <tools></tools>:\\n<tools>' + TOOLS + "
                  "'\\n</tools>\\n\\nTo call one, answer with a JSON object inside <tool_call></tool_call>:\\n<tool_call>\\n"
                  "{\"name\": <function name>, \"arguments\": <JSON object>}\\n</tool_call>" + end + "' -}}"
                  "{%- elif system -%}{{- '" + heads["system"] + "' + system + '" + end + "' -}}{%- endif -%}")
        call = "{{- '<tool_call>\\n' + " + _CALL_JSON + " + '\\n</tool_call>' -}}"
        result = "{{- '" + heads["user"] + "<tool_response>\\n' + m.content + '\\n</tool_response>" + end + "' -}}"
    elif tools == "llama3":
        system = ("{%- if tools -%}{{- '" + heads["system"] + "' + (system + '\\n\\n' if system else '') + "
                  "'You can call the functions below. To call one, answer with a JSON object "
                  "{\"name\": <function name>, \"parameters\": <JSON object>}.' + TOOLS + '" + end + "' -}}"
                  "{%- elif system -%}{{- '" + heads["system"] + "' + system + '" + end + "' -}}{%- endif -%}")
        call = "{{- ({'name': c.function.name, 'parameters': c.function.arguments} | tojson) -}}"
        result = "{{- '" + (tool_head or heads["user"]) + "' + m.content + '" + end + "' -}}"
    else:
        system = ("{%- if tools -%}{%- set system = (system + '\\n\\n' if system else '') + " + _GENERIC_TOOLS + " -%}"
                  "{%- endif -%}{%- if system -%}{{- '" + heads["system"] + "' + system + '" + end + "' -}}{%- endif -%}")
        call = "{{- '<tool_call>' + " + _CALL_JSON + " + '</tool_call>' -}}"
        result = "{{- '" + heads["user"] + "<tool_response>\\n' + m.content + '\\n</tool_response>" + end + "' -}}"
    if qwen3:
        think = ("{%- set reasoning = m.reasoning_content or '' -%}"
                 "{%- if loop.index0 > ns.last and (loop.last or reasoning) -%}"
                 "{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}")
        last_query = ("{%- set ns = namespace(last=-1) -%}{%- for m in rest -%}{%- if m.role == 'user' -%}"
                      "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}")
        generation_text = ("{{- '" + generation + "' -}}{%- if enable_thinking is defined and not enable_thinking -%}"
                           "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}")
    else:
        think, last_query, generation_text = _THINK, "", "{{- '" + generation + "' -}}"
    body = ("{%- for m in rest -%}"
            "{%- if m.role == 'assistant' -%}{{- '" + heads["assistant"] + "' -}}" + think +
            "{{- m.content or '' -}}"
            "{%- for c in m.tool_calls or [] -%}{%- if m.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
            + call + "{%- endfor -%}{{- '" + end + "' -}}"
            "{%- elif m.role == 'tool' -%}" + result +
            "{%- else -%}{{- (HEADS[m.role] if m.role in HEADS else '" + heads["user"] + "') + m.content + '" + end + "' -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}" + generation_text + "{%- endif -%}")
    heads_dict = "{%- set HEADS = " + repr({k: v for k, v in heads.items()}).replace("\\\\", "\\") + " -%}"
    return heads_dict + _system_text(default_system) + _tools_string() + bos + system + last_query + body


def _escape(text: str) -> str:
    return text.replace("\n", "\\n")


def _chatml(default_system: str = "", qwen3: bool = False) -> str:
    heads = {r: _escape(f"<|im_start|>{r}\n") for r in ("system", "user", "assistant")}
    return _headed(heads, _escape("<|im_end|>\n"), _escape("<|im_start|>assistant\n"), default_system=default_system,
                   tools="hermes", qwen3=qwen3)


def _llama3() -> str:
    heads = {r: _escape(f"<|start_header_id|>{r}<|end_header_id|>\n\n") for r in ("system", "user", "assistant")}
    return _headed(heads, "<|eot_id|>", heads["assistant"], bos="{{- bos_token -}}", tools="llama3",
                   tool_head=_escape("<|start_header_id|>ipython<|end_header_id|>\n\n"))


def _simple(heads: dict[str, str], end: str, generation: str, bos: str = "") -> str:
    return _headed({k: _escape(v) for k, v in heads.items()}, _escape(end), _escape(generation), bos=bos)


_OPTIONAL_BOS = "{%- if add_bos_token is defined and add_bos_token -%}{{- bos_token -}}{%- endif -%}"

_PLAIN = ("{%- set EOS = eos_token if eos_token is defined else '' -%}" + _system_text() + _tools_string()
          + "{%- if tools -%}{%- set system = (system + '\\n\\n' if system else '') + " + _GENERIC_TOOLS + " -%}{%- endif -%}"
          + _OPTIONAL_BOS + "{%- if system -%}{{- @SYS_HEAD@ + system + @SYS_END@ -}}{%- endif -%}"
          "{%- for m in rest -%}{%- if m.role == 'assistant' -%}{{- @ASSISTANT@ -}}" + _THINK +
          "{{- m.content or '' -}}{%- for c in m.tool_calls or [] -%}{%- if m.content or not loop.first -%}{{- '\\n' -}}"
          "{%- endif -%}{{- '<tool_call>' + " + _CALL_JSON + " + '</tool_call>' -}}{%- endfor -%}{{- @ASSISTANT_END@ -}}"
          "{%- elif m.role == 'tool' -%}{{- @USER@ + '<tool_response>\\n' + m.content + '\\n</tool_response>' + @USER_END@ -}}"
          "{%- else -%}{{- @USER@ + m.content + @USER_END@ -}}{%- endif -%}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- @PROMPT@ -}}{%- endif -%}")


def _plain_like(**parts: str) -> str:
    """_PLAIN with its pieces given as Jinja expressions (EOS is the tokenizer's eos, or nothing)."""
    out = _PLAIN
    for key, value in parts.items():
        out = out.replace(f"@{key.upper()}@", value.replace("\n", "\\n"))
    return out


# llama2, mistral and gemma fold the system text into the first user turn.
_FOLDED = ("{%- set EOS = eos_token if eos_token is defined else '' -%}" + _system_text() + _tools_string()
           + "@TOOLS_IN_SYSTEM@{{- bos_token -}}{%- set ns = namespace(first=true) -%}"
           "{%- for m in rest -%}{%- if m.role == 'user' -%}@USER@{%- set ns.first = false -%}"
           "{%- elif m.role == 'assistant' -%}@ASSISTANT@"
           "{%- elif m.role == 'tool' -%}@TOOL@{%- else -%}@OTHER@{%- endif -%}{%- endfor -%}"
           "{%- if add_generation_prompt -%}@PROMPT@{%- endif -%}")
_GENERIC_TOOL_SYSTEM = "{%- if tools -%}{%- set system = (system + '\\n\\n' if system else '') + " + _GENERIC_TOOLS + " -%}{%- endif -%}"
_GENERIC_CALLS = ("{%- for c in m.tool_calls or [] -%}{%- if m.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
                  "{{- '<tool_call>' + " + _CALL_JSON + " + '</tool_call>' -}}{%- endfor -%}")


def _folded(tools_in_system: str, user: str, assistant: str, tool: str, other: str, prompt: str) -> str:
    out = _FOLDED
    for key, value in (("@TOOLS_IN_SYSTEM@", tools_in_system), ("@USER@", user), ("@ASSISTANT@", assistant),
                       ("@TOOL@", tool), ("@OTHER@", other), ("@PROMPT@", prompt)):
        out = out.replace(key, value)
    return out


_LLAMA2 = _folded(
    _GENERIC_TOOL_SYSTEM,
    "{{- (bos_token if not ns.first else '') + '[INST] ' + ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if ns.first and system else '') + m.content + ' [/INST]' -}}",
    "{{- ' ' -}}" + _THINK + "{{- m.content or '' -}}" + _GENERIC_CALLS + "{{- ' ' + EOS -}}",
    "{{- (bos_token if not ns.first else '') + '[INST] <tool_response>\\n' + m.content + '\\n</tool_response> [/INST]' -}}",
    "{{- (bos_token if not ns.first else '') + '[INST] ' + m.content + ' [/INST]' -}}",
    "")

_MISTRAL = _folded(
    "",
    "{%- if ns.first and tools -%}{{- '[AVAILABLE_TOOLS] [' -}}{%- for t in tools -%}{%- if not loop.first -%}"
    "{{- ', ' -}}{%- endif -%}{{- t | tojson -}}{%- endfor -%}{{- '][/AVAILABLE_TOOLS]' -}}{%- endif -%}"
    "{{- '[INST] ' + (system + '\\n\\n' if ns.first and system else '') + m.content + '[/INST]' -}}",
    "{%- if m.reasoning_content or m.content -%}{{- ' ' -}}{%- endif -%}" + _THINK + "{{- m.content or '' -}}"
    "{%- if m.tool_calls -%}{{- '[TOOL_CALLS] [' -}}{%- for c in m.tool_calls -%}{%- if not loop.first -%}{{- ', ' -}}"
    "{%- endif -%}{{- " + _CALL_JSON + " -}}{%- endfor -%}{{- ']' -}}{%- endif -%}{{- EOS -}}",
    "{{- '[TOOL_RESULTS] ' + ({'content': m.content} | tojson) + '[/TOOL_RESULTS]' -}}",
    "{{- '[INST] ' + m.content + '[/INST]' -}}",
    "")

_GEMMA = _folded(
    _GENERIC_TOOL_SYSTEM,
    "{{- '<start_of_turn>user\\n' + (system + '\\n\\n' if ns.first and system else '') + m.content + '<end_of_turn>\\n' -}}",
    "{{- '<start_of_turn>model\\n' -}}" + _THINK + "{{- m.content or '' -}}" + _GENERIC_CALLS + "{{- '<end_of_turn>\\n' -}}",
    "{{- '<start_of_turn>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><end_of_turn>\\n' -}}",
    "{{- '<start_of_turn>user\\n' + m.content + '<end_of_turn>\\n' -}}",
    "{{- '<start_of_turn>model\\n' -}}")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEMPLATES: dict[str, str] = {
    "chatml": _chatml(),
    "qwen2.5": _chatml(QWEN_SYSTEM),
    "qwen3": _chatml(qwen3=True),
    "llama3": _llama3(),
    "llama2": _LLAMA2,
    "mistral": _MISTRAL,
    "gemma": _GEMMA,
    "phi-3": _simple({"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}, "<|end|>\n",
                     "<|assistant|>\n"),
    "zephyr": _plain_like(sys_head="'<|system|>\n'", sys_end="EOS + '\n'", user="'<|user|>\n'", user_end="EOS + '\n'",
                          assistant="'<|assistant|>\n'", assistant_end="EOS + '\n'", prompt="'<|assistant|>\n'"),
    "alpaca": _plain_like(sys_head="''", sys_end="'\n\n'", user="'### Instruction:\n'", user_end="'\n\n'",
                          assistant="'### Response:\n'", assistant_end="EOS + '\n\n'", prompt="'### Response:\n'"),
    "plain": _plain_like(sys_head="''", sys_end="'\n'", user="'User: '", user_end="'\n'", assistant="'Assistant: '",
                         assistant_end="EOS + '\n'", prompt="'Assistant:'"),
}
ALIASES = {"qwen2": "qwen2.5", "qwen": "qwen2.5", "qwen2_5": "qwen2.5", "llama-3": "llama3", "llama3.1": "llama3",
           "llama-2": "llama2", "mistral-instruct": "mistral", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi-3",
           "phi-3.5": "phi-3", "hermes": "chatml"}


def template_source(value: str) -> str:
    """The Jinja source of data.chat_template: a built-in name, a Jinja string, or a template file."""
    if not isinstance(value, str) or not value.strip():
        raise DeltaError(f"data.chat_template = {value!r}: give a built-in name ({', '.join(TEMPLATES)}), "
                         "a Jinja string or a .jinja file")
    name = ALIASES.get(value.lower(), value.lower())
    if name in TEMPLATES:
        return TEMPLATES[name]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DeltaError(f"data.chat_template: {path} is not UTF-8 text") from None
    raise DeltaError(f"data.chat_template = {value!r} is not a built-in template ({', '.join(TEMPLATES)}), "
                     "not a Jinja string (one with {{ or {%), and no file of that name exists")
