"""Prices and discounts."""

from shop.models import Product

BULK_DISCOUNT = 0.1


def price_for(product: Product, quantity: int) -> float:
    total = product.base_price * quantity
    if quantity >= 10:
        total *= 1 - BULK_DISCOUNT
    return round(total, 2)
