"""KB: a support knowledge-base MCP server with deterministic keyword search.

Ten seeded support articles (refunds, shipping, returns, warranty, payments, ...)
held in memory. Search scores articles by plain keyword matching, so the same query
always ranks the same articles the same way.

    python examples/servers/kb.py                # streamable HTTP on 127.0.0.1:9101 (the default)
    python examples/servers/kb.py --port 9200    # another port
    python examples/servers/kb.py --stdio        # stdio; logs go to stderr only
"""

import argparse
import json
import logging
import re
import sys
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from pydantic import BaseModel, Field

DEFAULT_PORT = 9101
HOST = "127.0.0.1"
# Words too common to say anything about which article is meant.
STOPWORDS = frozenset("a an and are can do does for how i in is it my of on or the to what when where why with".split())
TITLE_WEIGHT, TAG_WEIGHT, BODY_WEIGHT = 3.0, 2.0, 1.0


class Article(BaseModel):
    """A knowledge-base article."""

    id: str = Field(description="Article id, for example 'kb-001'.")
    title: str
    tags: list[str] = Field(description="Topic keywords.")
    body: str
    updated_at: str = Field(description="Last edit (ISO 8601 date).")


class SearchHit(BaseModel):
    """One ranked search result."""

    id: str = Field(description="Article id; pass it to get_article for the full text.")
    title: str
    snippet: str = Field(description="The sentence of the article that best matches the query.")
    score: float = Field(description="Keyword relevance; higher is better.")


class SearchResults(BaseModel):
    """Articles matching a query, best first."""

    query: str
    results: list[SearchHit]


def _article(n: int, title: str, tags: str, body: str) -> Article:
    return Article(id=f"kb-{n:03d}", title=title, tags=tags.split(), body=body, updated_at=f"2025-02-{n:02d}")


ARTICLES: tuple[Article, ...] = (
    _article(
        1,
        "Refund policy",
        "refund refunds money policy",
        "Refunds are issued to the original payment method within 5 business days of approval. "
        "Orders can be refunded in full up to 30 days after delivery. "
        "A refund can be cancelled by support before it is paid out.",
    ),
    _article(
        2,
        "Shipping times",
        "shipping delivery times carrier",
        "Standard shipping takes 3 to 5 business days; express shipping takes 1 to 2 business days. "
        "Orders placed before 2 pm ship the same day. "
        "You receive a tracking link by email once the order has shipped.",
    ),
    _article(
        3,
        "Returning an item",
        "returns return label exchange",
        "Items can be returned within 30 days of delivery in their original packaging. "
        "Start a return from your order page to print a prepaid return label. "
        "Once the warehouse receives the item, the refund is processed automatically.",
    ),
    _article(
        4,
        "Warranty coverage",
        "warranty repair defect guarantee",
        "Electronics carry a two-year warranty against manufacturing defects. "
        "Furniture is covered for five years. "
        "Accidental damage and normal wear are not covered by the warranty.",
    ),
    _article(
        5,
        "Failed payments",
        "payment failed declined card billing",
        "A payment can fail when the card is declined, expired or blocked by the bank. "
        "Failed orders are not shipped and no money is taken. "
        "Retry the payment with another card or contact your bank, then place the order again.",
    ),
    _article(
        6,
        "Tracking your order",
        "tracking order status shipped",
        "Your order page shows the current status: processing, shipped, delivered or failed. "
        "Shipped orders include a carrier tracking number. "
        "Tracking can take up to 24 hours to update after the order ships.",
    ),
    _article(
        7,
        "Cancelling an order",
        "cancel cancellation order processing",
        "Orders can be cancelled while they are still processing. "
        "Once an order has shipped it cannot be cancelled; return it instead for a refund. "
        "Cancelled orders are refunded in full.",
    ),
    _article(
        8,
        "International shipping",
        "shipping international customs duties",
        "We ship to 40 countries. International shipping takes 7 to 14 business days. "
        "Customs duties and import taxes are paid by the recipient on delivery.",
    ),
    _article(
        9,
        "Damaged or missing items",
        "damaged missing broken replacement",
        "If an item arrives damaged or is missing from the parcel, report it within 7 days with a photo. "
        "We send a free replacement or issue a full refund, whichever you prefer.",
    ),
    _article(
        10,
        "Resetting your password",
        "account password login reset",
        "Use the forgotten password link on the sign-in page to get a reset email. "
        "Reset links expire after one hour. "
        "Contact support if the email does not arrive within ten minutes.",
    ),
)


def _terms(text: str) -> list[str]:
    return [word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in STOPWORDS]


def _matches(term: str, words: list[str]) -> int:
    # A prefix match lets "refund" find "refunded" and "ship" find "shipping".
    return sum(1 for word in words if word.startswith(term))


def score_article(article: Article, terms: list[str]) -> float:
    """Weighted keyword score of `article` for the query `terms` (0 when nothing matches)."""
    title, tags, body = _terms(article.title), [tag.lower() for tag in article.tags], _terms(article.body)
    return sum(
        TITLE_WEIGHT * _matches(term, title) + TAG_WEIGHT * _matches(term, tags) + BODY_WEIGHT * _matches(term, body)
        for term in terms
    )


def _snippet(article: Article, terms: list[str]) -> str:
    sentences = re.split(r"(?<=\.) ", article.body)
    return max(sentences, key=lambda sentence: sum(_matches(term, _terms(sentence)) for term in terms))


def search_articles(query: str, limit: int) -> list[SearchHit]:
    """Rank the articles for `query`: highest score first, ties by id; articles scoring 0 are left out."""
    terms = _terms(query)
    scored = [(score_article(article, terms), article) for article in ARTICLES]
    ranked = sorted((pair for pair in scored if pair[0] > 0), key=lambda pair: (-pair[0], pair[1].id))
    return [
        SearchHit(id=article.id, title=article.title, snippet=_snippet(article, terms), score=score)
        for score, article in ranked[:limit]
    ]


def _find(article_id: str) -> Article | None:
    return next((article for article in ARTICLES if article.id == article_id), None)


def build_server() -> MCPServer:
    """Build the knowledge-base server."""
    mcp = MCPServer(
        "kb", version="1.0.0", instructions="Search and read customer-support articles.", log_level="WARNING"
    )

    @mcp.tool()
    def search(
        query: Annotated[str, Field(description="Keywords, for example 'refund failed payment'.")],
        limit: Annotated[int, Field(ge=1, le=10, description="Maximum number of results.")] = 3,
    ) -> SearchResults:
        """Search the support knowledge base by keywords; returns the best-matching articles, best first."""
        return SearchResults(query=query, results=search_articles(query, limit))

    @mcp.tool()
    def get_article(article_id: Annotated[str, Field(description="Article id, for example 'kb-001'.")]) -> Article:
        """Fetch the full text of one knowledge-base article by id."""
        article = _find(article_id)
        if article is None:
            raise ToolError(f"Article {article_id!r} not found")
        return article

    @mcp.resource("kb://articles/{article_id}", name="article", mime_type="text/markdown")
    def article_resource(article_id: str) -> str:
        """One article as Markdown."""
        article = _find(article_id)
        if article is None:
            raise ResourceNotFoundError(f"Article {article_id!r} not found")
        return f"# {article.title}\n\n{article.body}\n"

    @mcp.resource("kb://index", name="index", mime_type="application/json")
    def index_resource() -> str:
        """The id and title of every article."""
        return json.dumps([{"id": article.id, "title": article.title} for article in ARTICLES], indent=2)

    return mcp


def main(argv: list[str] | None = None) -> None:
    """Serve streamable HTTP on 127.0.0.1 (the default), or stdio with `--stdio`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdio", action="store_true", help="serve stdio instead of streamable HTTP")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mcp = build_server()
    if args.stdio:
        mcp.run("stdio")
    else:
        print(f"kb: serving streamable HTTP on http://{HOST}:{args.port}/mcp", file=sys.stderr, flush=True)
        mcp.run("streamable-http", host=HOST, port=args.port)


if __name__ == "__main__":
    main()
