"""The README's and docs/*.md's commands and links point at what exists and parse as written.

Every ```bash block is read as commands: the files they name (tools, configs, tests) exist, each
Python tool's command line is parsed by the tool's own argument parser (the tool stops there, in
this process, before doing any work), and each option given to a shell tool is one it handles.
Repository paths quoted in the text and relative links (with their #anchors) resolve too.
"""
import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PAGES = [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md'))]
#: Top-level folders whose paths the pages name and that must exist.
CHECKED_FOLDERS = ('tools/', 'configs/', 'tests/', 'docs/', 'requirements/', 'mmdat/', '.ci/')
#: Made by setup.py in an install, not in a checkout.
GENERATED = ('mmdat/.mim/', )
#: Commands that are not the project's (set-up steps of pip, venv, shell).
OTHER_PROGRAMS = {'pip', 'pip3', 'source', 'cd', 'export', 'mim', 'git', 'python3 -m venv'}


def page_id(page):
    return str(page.relative_to(REPO_ROOT))


def commands(page):
    """(line number, argv) of each command in the page's bash blocks, comments and backslash
    continuations resolved; leading ``VAR=value`` assignments dropped."""
    text = page.read_text()
    found = []
    for block in re.finditer(r'^ *```(?:bash|sh|shell)\n(.*?)^ *```', text, re.S | re.M):
        first_line = text.count('\n', 0, block.start()) + 2
        logical, start = '', None
        for offset, line in enumerate(block.group(1).splitlines()):
            line = re.sub(r'(^|\s)#.*$', '', line).rstrip()
            if start is None:
                start = first_line + offset
            if line.endswith('\\'):
                logical += line[:-1] + ' '
                continue
            logical += line
            argv = shlex.split(logical)
            while argv and re.match(r'^[A-Z_]+=', argv[0]):
                argv = argv[1:]
            if argv:
                found.append((start, argv))
            logical, start = '', None
    return found


def all_commands():
    return [pytest.param(page, line, argv, id=f'{page_id(page)}:{line}')
            for page in PAGES for line, argv in commands(page)]


def named_paths(tokens):
    """The tokens that are paths in the checked folders (not patterns or placeholders)."""
    for token in tokens:
        token = token.strip('[]')
        if (token.startswith(CHECKED_FOLDERS) and not token.startswith(GENERATED)
                and not any(c in token for c in '*{}<>') and '...' not in token):
            yield token


def without_optional_groups(argv):
    """The command without its ``[...]`` groups (usage notation for optional arguments)."""
    kept, depth = [], 0
    for token in argv:
        depth += token.count('[') if token.startswith('[') else 0
        if depth == 0:
            kept.append(token)
        depth -= token.count(']') if token.endswith(']') else 0
    return kept


class ToolStopped(Exception):
    """Raised in place of the tool's work once its arguments are parsed."""


def parse_with_the_tool(script, argv, monkeypatch, capsys):
    """Run ``script`` as ``__main__`` with ``argv`` until it parses its arguments. Returns the
    parser's option strings and, if the parser refused ``argv``, its message."""
    seen = {}
    real_parse_args = argparse.ArgumentParser.parse_args
    real_parse_known_args = argparse.ArgumentParser.parse_known_args

    def parse_args(parser, args=None, namespace=None):
        seen['options'] = set(parser._option_string_actions)
        seen['inside'] = True
        try:
            real_parse_args(parser, args, namespace)
        except SystemExit:
            seen['error'] = capsys.readouterr().err.strip() or 'exit'
        raise ToolStopped

    def parse_known_args(parser, args=None, namespace=None):
        if seen.get('inside'):
            return real_parse_known_args(parser, args, namespace)
        seen['options'] = set(parser._option_string_actions)
        raise ToolStopped  # a tool should not accept unknown options silently: stop it anyway

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', parse_known_args)
    monkeypatch.setattr(sys, 'argv', [str(script), *argv])
    with pytest.raises(ToolStopped):
        runpy.run_path(str(script), run_name='__main__')
    return seen['options'], seen.get('error')


@pytest.mark.parametrize('page,line,argv', all_commands())
def test_command_names_existing_files_and_parses(page, line, argv, monkeypatch, capsys):
    missing = [path for path in named_paths(argv) if not (REPO_ROOT / path).exists()]
    assert missing == []
    program = argv[0]
    if program in ('python', 'python3', '.venv/bin/python') and len(argv) > 1 and argv[1].endswith('.py'):
        script, args = REPO_ROOT / argv[1], argv[2:]
        options, error = parse_with_the_tool(script, without_optional_groups(args), monkeypatch, capsys)
        given = {token.strip('[]').split('=')[0] for token in args if token.strip('[').startswith('--')}
        assert given <= options, f'{argv[1]} has no option {sorted(given - options)}'
        assert error is None, f'{argv[1]} refuses the command: {error}'
    elif program == 'bash' or program.endswith('.sh'):
        script = argv[1] if program == 'bash' else program
        source = (REPO_ROOT / script).read_text()
        for option in (token.strip('[]') for token in argv if token.strip('[').startswith('--')):
            assert re.search(rf'(^|[\s|]){re.escape(option)}[)|]', source, re.M), f'{script} has no {option}'
    elif program == 'mim' and argv[1:3] == ['train', 'mmdat']:
        assert (REPO_ROOT / 'configs' / argv[3]).is_file()
    else:
        assert program in OTHER_PROGRAMS or ' '.join(argv[:3]) in OTHER_PROGRAMS or argv[:3] == [
            '.venv/bin/python', '-m', 'pytest'] or program in ('pytest', '.venv/bin/pip'), \
            f'a command this test does not know how to check: {argv}'


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_paths_quoted_in_the_text_exist(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    quoted = [token for span in re.findall(r'`([^`\n]+)`', text) for token in span.split()]
    missing = [path for path in named_paths(token.strip('(),.;:') for token in quoted)
               if not (REPO_ROOT / path).exists()]
    assert missing == []


def anchors(page):
    """GitHub's ids of the page's headings."""
    ids = set()
    for heading in re.findall(r'^#+ +(.+?) *$', re.sub(r'```.*?```', '', page.read_text(), flags=re.S), re.M):
        ids.add(re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-'))
    return ids


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_relative_links_resolve(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+:', target):
            continue  # a URL
        path, _, anchor = target.partition('#')
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == '.md' and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_checks_see_every_page_and_the_commands_in_them(monkeypatch, capsys):
    """What the tests above read: each page, the README's commands, and a tool's refusal."""
    options, error = parse_with_the_tool(REPO_ROOT / 'tools' / 'train.py', ['CONFIG', '--no-such-option'],
                                         monkeypatch, capsys)
    assert '--work-dir' in options and 'unrecognized arguments: --no-such-option' in error
    assert {page_id(p) for p in PAGES} >= {'README.md', 'docs/install.md', 'docs/tools.md', 'docs/testing.md'}
    readme = [argv for _, argv in commands(REPO_ROOT / 'README.md')]
    assert ['python', 'tools/train.py', 'configs/retinanet_dat_t_coco.py'] in readme
    assert without_optional_groups(['a', '[--b', 'N]', 'c', '[--d]']) == ['a', 'c']
    assert list(named_paths(['configs/{a,b}.py', 'tools/x.py', 'mmdat/.mim/tools', '[tests/y]'])) == [
        'tools/x.py', 'tests/y']
