"""Orders and their lifecycle."""

from shop import billing
from shop.models import Product


class Order:
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        self.lines: list[tuple[Product, int]] = []
        self.status = "open"

    def add(self, product: Product, quantity: int) -> None:
        self.lines.append((product, quantity))

    def total(self) -> float:
        return sum(p.price(q) for p, q in self.lines)

    def checkout(self) -> str:
        invoice = billing.invoice(self)
        self.status = "billed"
        return invoice
