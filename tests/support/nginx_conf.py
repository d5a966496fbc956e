"""A small reader of nginx configuration files, enough to check directives in tests.

It tokenizes like nginx (``#`` comments, single/double quotes, ``;`` ends a directive, ``{ }``
open and close a block) and returns a tree of directives. It does not know which directives
exist: the tests ask for the ones they care about.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list[Directive] = field(default_factory=list)

    def find(self, name: str) -> list[Directive]:
        return [c for c in self.children if c.name == name]

    def one(self, name: str) -> Directive:
        found = self.find(name)
        if len(found) != 1:
            raise AssertionError(f"expected one {name!r} in {self.name}, found {len(found)}")
        return found[0]

    def walk(self) -> Iterator[Directive]:
        for child in self.children:
            yield child
            yield from child.walk()


def _tokens(text: str) -> Iterator[str]:
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif char in "{};":
            yield char
            i += 1
        elif char in "'\"":
            end = text.index(char, i + 1)
            yield text[i + 1 : end]
            i = end + 1
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in "{};":
                i += 1
            yield text[start:i]


def parse_nginx(text: str) -> Directive:
    root = Directive("main", [])
    stack = [root]
    words: list[str] = []
    for token in _tokens(text):
        if token == ";":
            if not words:
                raise ValueError("empty directive")
            stack[-1].children.append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            block = Directive(words[0], words[1:])
            stack[-1].children.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            if words or len(stack) == 1:
                raise ValueError("unbalanced '}' or a directive without ';'")
            stack.pop()
        else:
            words.append(token)
    if words or len(stack) != 1:
        raise ValueError("unterminated directive or block")
    return root
