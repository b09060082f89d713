"""Pool sizing: simulate pdserve's scheduler over a measured step-time profile (``simulate``) and pick
the configuration with the most goodput per GPU (``plan``); ``pdserve profile`` / ``pdserve plan``."""
