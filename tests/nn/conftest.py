import os
import sys

# module_checks.py (properties every attention module must have) serves mixers/, plugins/ and layers/.
sys.path.insert(0, os.path.dirname(__file__))
