"""The safety layer every command path goes through (ROS nodes, teleop, sim evaluation).

Pure Python and NumPy (no rclpy), so plain env/policy runners can use it as well as the ROS nodes:
`SafetyLimits` (position/velocity/acceleration limits of a joint group from the robot model), `Workspace`
(grasp-site bounds through forward kinematics), `SafetyFilter` (rejects malformed commands, clamps the rest,
latches an e-stop, counts everything) and `Watchdog` (input freshness).
"""

from vla_stack.safety.filter import CommandRejected, SafeTrajectory, SafetyFilter
from vla_stack.safety.limits import SafetyLimits, Workspace
from vla_stack.safety.watchdog import Watchdog

__all__ = ["CommandRejected", "SafeTrajectory", "SafetyFilter", "SafetyLimits", "Watchdog", "Workspace"]
