"""Domain objects."""

from dataclasses import dataclass

from shop import pricing


@dataclass
class Product:
    sku: str
    name: str
    base_price: float

    def price(self, quantity: int) -> float:
        return pricing.price_for(self, quantity)
