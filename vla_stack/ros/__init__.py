"""ROS 2 nodes (rclpy): sim_node, policy_node, teleop_node, recorder_node, safety_node, and the one-process and
benchmark commands in vla_stack.ros.commands. Import rclpy only from here, never from the rest of the stack."""
