"""fedssl_core: what more than one fedssl service needs.

Model construction (`models`), weight (de)serialisation (`weights`), the image
preprocessing shared by training-time evaluation and serving (`preprocessing`), tokens read
from mounted Secret files (`tokens`), and the names every service agrees on (`names`). Nothing here imports Flower or FastAPI.
"""
