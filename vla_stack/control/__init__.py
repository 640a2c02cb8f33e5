"""Robot-side control helpers shared by experts, teleop and the ROS nodes (inverse kinematics)."""
