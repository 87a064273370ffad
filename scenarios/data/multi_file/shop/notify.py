"""Customer notifications."""

from shop.orders import Order

SENT: list[str] = []


def order_billed(order: Order, text: str) -> None:
    SENT.append(f"to customer of {order.order_id}: {text}")
