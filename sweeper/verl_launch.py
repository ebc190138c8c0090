"""The user's verl launch, read as verl reads it: shell script -> Hydra overrides -> verl's composed config.

Three steps, each a function:
1. `read_launch`: the script's words as bash would pass them. Line continuations, quoting and comments by the
   standard library's `shlex`; before it, a small expander for the subset launch scripts use: `export VAR=...`
   and `VAR=...` lines, `$VAR`, `${VAR}`, `${VAR:-default}`, positional `$1`, and the pass-through `"$@"`,
   `"${@:N}"`, `$*` (the script's arguments, given after the script). Anything else (`$(...)`, backticks,
   `$((...))`, `${VAR/x/y}`, a variable that is never set) becomes a placeholder `__UNRESOLVED_NAME__`, which
   `--var NAME=VALUE` fills (a --var wins over the script's own assignment). Unquoted expansions are not
   word-split (a path with spaces stays one word). The first line that runs `-m verl.trainer.main_ppo` (or
   `main_ppo_v0`, or `--entry MODULE`) is the launch; its words up to a pipe, `;`, `&&` or a redirect are the
   overrides.
2. `find_verl_config`: that verl version's own `trainer/config` folder: the installed verl's (found without
   importing verl, whose `__init__` needs ray), or `--verl-config DIR` (a fork's folder, another release's).
3. `compose_launch`: Hydra composes `ppo_trainer` with the overrides exactly as `python -m verl.trainer.main_ppo`
   does, so interpolated defaults (`critic.ppo_mini_batch_size: ${oc.select:actor_rollout_ref.actor...}`) come
   out as verl resolves them. A rejected override is one SpecError line naming it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from critic.sections import SpecError

ENTRIES = ("verl.trainer.main_ppo", "verl.trainer.main_ppo_v0")
CONFIG_NAME = "ppo_trainer"  # main_ppo's @hydra.main(config_name=...)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_PASS_THROUGH = re.compile(r'"?\$(?:@|\*|\{@\}|\{\*\}|\{@:(\d+)\})"?')  # "$@", "${@:1}", $*, ...
_EXPANSION = re.compile(rf"\$(?:\{{({_NAME})(?:(:?[-=?+])(.*?))?\}}|({_NAME})|(\d)|\{{(\d+)\}})")
_UNSUPPORTED = re.compile(r"\$\(\(.*?\)\)|\$\(.*?\)|`.*?`|\$\{[^}]*\}")  # arithmetic, command substitution, ${x/..}
_ASSIGNMENT = re.compile(rf"({_NAME})=(.*)", re.DOTALL)


@dataclass(frozen=True)
class Launch:
    """One verl invocation: where it came from, its module, and its Hydra overrides after expansion."""
    source: str
    entry: str
    overrides: list[str]
    unresolved: dict[str, str] = field(default_factory=dict)  # placeholder -> the shell text it stands for

    def placeholders_in(self, value: Any) -> list[str]:
        """The shell text of every placeholder in `value` (e.g. ['$MODEL_PATH'])."""
        return [text for mark, text in self.unresolved.items() if mark in str(value)]

    def how_to_resolve(self, value: Any) -> str:
        """What the user passes to fill the placeholders in `value`: '--var MODEL_PATH=VALUE', ..."""
        fixes = []
        for mark, text in self.unresolved.items():
            if mark in str(value):
                name = mark[len("__UNRESOLVED_"):-2]
                if name.startswith("COMMAND"):
                    fixes.append(f"{text} is not run by this tool: write its value into the script")
                elif name.startswith("ARG"):
                    fixes.append(f"{text} is the script's argument {name[3:]}: give it after the script")
                else:
                    fixes.append(f"{text} is not set by the script: pass --var {name}=VALUE")
        return "; ".join(fixes)


class _Expander:
    """Bash's expansion of one line, for the subset in the module docstring; records what it could not expand."""

    def __init__(self, variables: dict[str, str], args: list[str], forced: dict[str, str]):
        self.variables, self.args, self.forced = variables, args, forced
        self.unresolved: dict[str, str] = {}

    def placeholder(self, name: str, text: str) -> str:
        if name == "COMMAND":  # $(...) and the like: numbered, each its own
            name = f"COMMAND{sum(mark.startswith('__UNRESOLVED_COMMAND') for mark in self.unresolved) + 1}"
        mark = f"__UNRESOLVED_{re.sub(r'[^A-Za-z0-9_]', '_', name).upper()}__"
        self.unresolved[mark] = text
        return mark

    def value(self, match: re.Match) -> str:
        """${NAME}, ${NAME:-default} (also -, =, :=), ${NAME:?message} (set or unresolved), ${NAME:+alt}, $1."""
        name, operator, word, bare, digit, braced_digit = match.groups()
        if digit or braced_digit:  # $1: the script's own argument
            index = int(digit or braced_digit)
            return self.args[index - 1] if 0 < index <= len(self.args) else self.placeholder(f"ARG{index}", match[0])
        name = name or bare
        value = self.forced.get(name, self.variables.get(name))
        is_set = value is not None and (value != "" or not (operator or "").startswith(":"))
        if operator and operator[-1] == "+":
            return self.expand_text(word) if is_set else ""
        if is_set:
            return value
        if operator and operator[-1] in "-=":
            return self.expand_text(word)
        return self.placeholder(name, match[0])

    def expand_text(self, text: str) -> str:
        """Expansions inside a text that is already one word (a double-quoted part, a default)."""
        text = _EXPANSION.sub(self.value, text)
        return _UNSUPPORTED.sub(lambda m: self.placeholder("COMMAND", m[0]), text)

    def line(self, line: str) -> str:
        """The line with every expansion done, re-quoted so that shlex reads each result as literal text."""
        out, i = [], 0
        while i < len(line):
            char = line[i]
            passed = _PASS_THROUGH.match(line, i)
            if passed and (passed[0].startswith('"') == passed[0].endswith('"')):
                out.append(" ".join(shlex.quote(a) for a in self.args[int(passed[1] or 1) - 1:]))
                i = passed.end()
            elif char == "'":  # single quotes: literal
                end = line.find("'", i + 1)
                end = len(line) if end < 0 else end
                out.append(line[i:end + 1])
                i = end + 1
            elif char == '"':
                end = i + 1
                while end < len(line) and line[end] != '"':
                    end += 2 if line[end] == "\\" else 1
                out.append(shlex.quote(self.expand_text(line[i + 1:end])))
                i = end + 1
            elif char == "\\":
                out.append(line[i:i + 2])
                i += 2
            elif char == "$":
                match = _UNSUPPORTED.match(line, i) if line.startswith(("$(", "${"), i) else None
                expansion = _EXPANSION.match(line, i)
                if expansion and (match is None or expansion.end() == match.end()):
                    out.append(shlex.quote(self.value(expansion)))
                    i = expansion.end()
                elif match:
                    out.append(self.placeholder("COMMAND", match[0]))
                    i = match.end()
                else:
                    out.append(char)
                    i += 1
            elif char == "`":
                match = _UNSUPPORTED.match(line, i)
                out.append(self.placeholder("COMMAND", match[0]) if match else char)
                i = match.end() if match else i + 1
            else:
                out.append(char)
                i += 1
        return "".join(out)


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        return list(lexer)
    except ValueError as exc:  # "No closing quotation"
        raise SpecError(f"cannot read the line {line.strip()[:80]!r}: {exc}; close its quotes") from None


def _command_words(words: list[str]) -> list[str]:
    """The words of one command: up to a pipe, `;`, `&&` or a redirect (and a redirect's fd, the 2 of 2>&1)."""
    for index, word in enumerate(words):
        if word and set(word) <= set("();<>|&"):
            return words[:index - 1] if index and words[index - 1].isdigit() and word[0] in "<>" else words[:index]
    return words


def read_launch(text: str, source: str, args: list[str] = (), variables: dict[str, str] | None = None,
                entry: str | None = None) -> Launch:
    """The first verl invocation in a launch script (or a command line), its overrides expanded."""
    forced = dict(variables or {})
    expander = _Expander({}, list(args), forced)
    entries = (entry,) if entry else ENTRIES
    for raw_line in text.replace("\\\r\n", " ").replace("\\\n", " ").splitlines():
        stripped = raw_line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        words = _command_words(_words(expander.line(stripped)))
        names = words[1:] if words[:1] in (["export"], ["declare"], ["readonly"], ["local"]) else words
        assignments = [_ASSIGNMENT.fullmatch(word) for word in names if not word.startswith("-")]
        if assignments and all(assignments):  # `export A=1 B=$A`: set, in order
            for assignment in assignments:
                expander.variables[assignment[1]] = assignment[2]
            continue
        for index in range(len(words) - 1):
            if words[index] == "-m" and words[index + 1] in entries:
                return Launch(source, words[index + 1], words[index + 2:], dict(expander.unresolved))
    raise SpecError(f"{source}: no verl invocation found: no line runs `python3 -m {' or -m '.join(entries)}`; "
                    f"pass the script that launches verl, or --entry MODULE for your fork's entry point")


def load_launch(script_or_cmdline: str, args: list[str] = (), variables: dict[str, str] | None = None,
                entry: str | None = None) -> Launch:
    """read_launch on a script file, or on the text itself when no such file exists."""
    path = Path(script_or_cmdline).expanduser()
    if path.is_file():
        return read_launch(path.read_text(), str(path), args, variables, entry)
    if "\n" not in script_or_cmdline and " " not in script_or_cmdline.strip():
        raise SpecError(f"launch script not found: {path.resolve()}; give the script's path or the command line "
                        f"itself in quotes")
    return read_launch(script_or_cmdline, "<command line>", args, variables, entry)


def parse_vars(items: list[str]) -> dict[str, str]:
    """['MODEL_PATH=/ckpt'] -> {'MODEL_PATH': '/ckpt'}; raises SpecError for a malformed item."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(_NAME, name):
            raise SpecError(f"--var expects NAME=VALUE (e.g. --var MODEL_PATH=/ckpt/qwen), got {item!r}")
        out[name] = value
    return out


@dataclass(frozen=True)
class VerlSource:
    """A verl release's config folder and version, e.g. ('.../verl/trainer/config', '0.9.1')."""
    config_dir: Path
    version: str

    @property
    def short(self) -> str:
        return ".".join(self.version.split(".")[:2])


def find_verl_config(version: str | None = None, config_dir: str | None = None) -> VerlSource:
    """--verl-config DIR (version from --verl-version), else the installed verl's folder (its version must match)."""
    if config_dir is not None:
        folder = Path(config_dir).expanduser().resolve()
        if not (folder / f"{CONFIG_NAME}.yaml").is_file():
            raise SpecError(f"--verl-config {folder}: no {CONFIG_NAME}.yaml there; give verl's trainer/config folder "
                            f"(e.g. YOUR_FORK/verl/trainer/config)")
        if version is None:
            raise SpecError(f"--verl-config {folder}: say which verl release it is with --verl-version X.Y")
        return VerlSource(folder, version)
    spec = importlib.util.find_spec("verl")  # no import: verl's __init__ needs ray
    if spec is None or not spec.submodule_search_locations:
        raise SpecError("verl is not installed here: `pip install --no-deps -r requirements-verl.txt` (its config "
                        "files are all this needs), or --verl-config DIR with your verl's trainer/config folder")
    installed = importlib.metadata.version("verl")
    if version is not None and not (installed + ".").startswith(version.rstrip(".") + "."):
        raise SpecError(f"--verl-version {version}, but verl {installed} is installed: pass --verl-config DIR with "
                        f"verl {version}'s trainer/config folder, or drop --verl-version")
    return VerlSource(Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config", installed)


def compose_overrides(source: VerlSource, overrides: list[str], where: str = "your command"):
    """verl's `ppo_trainer` config composed by Hydra with `overrides` (an OmegaConf DictConfig, unresolved)."""
    try:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise SpecError("hydra-core is not installed: pip install --no-deps -r requirements-verl.txt") from None
    try:
        with initialize_config_dir(config_dir=str(source.config_dir), version_base=None):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0]
        hint = ""
        if "Could not override" in first or "Key '" in first:
            hint = (f"; verl {source.version} has no such key: a key of another verl version (check its name "
                    f"there), or one only your fork defines (pass --verl-config with your fork's trainer/config "
                    f"folder, or write it ++key=value)")
        elif "Could not append" in first:
            hint = "; the key already exists in verl's config: write it key=value (or ++key=value), without the +"
        raise SpecError(f"{where}: verl {source.version}'s config rejects an override: {first}{hint}") from None


def compose_launch(launch: Launch, source: VerlSource):
    """The launch's config exactly as verl composes it."""
    return compose_overrides(source, launch.overrides, launch.source)


def select(cfg, key: str) -> Any:
    """The resolved value at a dotted key (None where verl's config has no such key); lists and dicts as plain."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
    except OmegaConfBaseException as exc:
        raise SpecError(f"verl's config cannot resolve {key}: {str(exc).splitlines()[0]}") from None
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def override_key(override: str) -> str:
    """'++critic.optim.lr=1e-6' -> 'critic.optim.lr' (Hydra's +/++/~ prefixes and the value removed)."""
    return override.split("=", 1)[0].lstrip("+~").strip()
