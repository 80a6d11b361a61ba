"""The pages of a paged cache, host side: a free list, reference counts and, optionally,
automatic prefix caching.

Prefix caching as vLLM does it (automatic prefix caching; Kwon et al., arXiv 2309.06180,
and vLLM's design notes): a full page is named by a hash chain, hash(the previous page's
hash, its token ids), so a page's name stands for the whole prefix up to its end. When a
sequence fills a page the page is registered under that name; a new request walks its
prompt's full pages through the chain and takes every page found (its reference count
goes up) instead of prefilling those tokens. A page nobody holds stays cached, in
least-recently-used order, and is reused for a new page only when no free page is left.
A request never reuses the page holding its prompt's last token: that token's logits
must be computed.

Python's `hash` of a tuple of ints is stable within a process, which is as long as a
cache lives; a chain that collides would need two prefixes with equal 64-bit hashes at
every page (vLLM uses the same construction).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class PagePool:
    """Free pages, the pages in use and how many hold each, and (with `prefix_cache`)
    the full pages named by their hash chains."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_cache: bool = False):
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self._free = collections.deque(range(num_pages))
        self._holders: dict[int, int] = {}  # page -> sequences holding it
        self._by_name: dict[int, int] = {}  # hash chain -> page
        self._name_of: dict[int, int] = {}  # page -> hash chain
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    @property
    def free(self) -> int:
        """Pages that can be taken: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def cached(self) -> int:
        """Pages named in the prefix cache (held or not)."""
        return len(self._by_name)

    def take(self, n: int) -> list[int] | None:
        """n pages for new tokens, or None (and nothing taken) if fewer can be taken; a
        cached page nobody holds is reused (least recently used first) only when no free
        page is left."""
        if n > self.free:
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._idle.popitem(last=False)
                del self._by_name[self._name_of.pop(page)]
            self._holders[page] = 1
            pages.append(page)
        return pages

    def give(self, pages: Sequence[int]):
        """A sequence lets go of its pages; a cached one nobody holds waits, most recently
        used last, until its page is needed."""
        for page in pages:
            self._holders[page] -= 1
            if self._holders[page]:
                continue
            del self._holders[page]
            if page in self._name_of:
                self._idle[page] = None
            else:
                self._free.append(page)

    def names(self, tokens: Sequence[int], known: Sequence[int] = ()) -> list[int]:
        """The hash chain of every full page of `tokens`, extending `known` (the chain of
        its first pages, already computed)."""
        names, size = list(known), self.page_size
        for start in range(len(names) * size, len(tokens) - size + 1, size):
            parent = names[-1] if names else None
            names.append(hash((parent, tuple(tokens[start : start + size]))))
        return names

    def register(self, pages: Sequence[int], names: Sequence[int]):
        """Name a sequence's full pages (the first len(names) of `pages`) in the cache; a
        name already cached keeps its page."""
        if not self.prefix_cache:
            return
        for page, name in zip(pages, names, strict=False):
            if name not in self._by_name and page not in self._name_of:
                self._by_name[name], self._name_of[page] = page, name

    def is_cached(self, name: int) -> bool:
        """Whether a page of this name is in the cache (held or not)."""
        return name in self._by_name

    def lookup(self, names: Sequence[int]) -> list[int]:
        """The cached pages of the longest run of `names` from the first, now held once
        more by the caller."""
        pages = []
        for name in names if self.prefix_cache else ():
            page = self._by_name.get(name)
            if page is None:
                break
            self._idle.pop(page, None)
            self._holders[page] = self._holders.get(page, 0) + 1
            pages.append(page)
        return pages
