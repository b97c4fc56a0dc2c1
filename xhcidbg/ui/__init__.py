"""The debugger console: commands, rich views of the controller, breakpoints, and the in-process
world (controller, devices, scripted guest) they run against."""
from .console import Console
from .world import World, WorldOptions

__all__ = ["Console", "World", "WorldOptions"]
