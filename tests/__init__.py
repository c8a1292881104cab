"""Trial suite of bridge.  Importing it sets Django up on a throwaway database."""

from tests.support import setup_django

setup_django()
