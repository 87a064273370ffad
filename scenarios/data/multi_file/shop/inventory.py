"""Stock levels (no cycle here: imports only models)."""

from shop.models import Product

STOCK: dict[str, int] = {}


def receive(product: Product, quantity: int) -> None:
    STOCK[product.sku] = STOCK.get(product.sku, 0) + quantity


def available(product: Product) -> int:
    return STOCK.get(product.sku, 0)
